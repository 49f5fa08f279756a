"""Build the closed-book QA set for hallucination detection: hand-written short-answer questions with aliases.

Categories: country capitals, chemical symbols and atomic numbers, authors, astronomy, basic science and
numbers, historical dates, historical figures, art / music / inventions, geography, languages and currencies,
animals and miscellany. The first answer is the canonical one; the others are accepted aliases (spellings,
surnames, digits and words). Correctness is :func:`workbench.hallucination.qa.is_correct` (a normalised alias
as a whole-word span of the normalised prediction), so single-letter symbols that are common words or leftovers
of normalisation (``I``, ``S``, ``As``, ``Be``) are left out, and :func:`workbench.hallucination.qa.check_items`
rejects any alias occurring in its own question. Questions of the answer prompt's few-shot examples
(``workbench.hallucination.generation.DEFAULT_SHOTS``) are excluded.

    .venv/bin/python experiments/build_closed_book_qa.py

writes experiments/data/closed_book_qa.jsonl (one ``{"id", "question", "answers", "category"}`` per line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.hallucination.generation import DEFAULT_SHOTS
from workbench.hallucination.qa import QAItem, normalize_answer, write_qa

OUT = Path("experiments/data/closed_book_qa.jsonl")

CAPITALS = [
    ("France", ["Paris"]), ("Germany", ["Berlin"]), ("Spain", ["Madrid"]), ("Portugal", ["Lisbon", "Lisboa"]),
    ("the United Kingdom", ["London"]), ("Ireland", ["Dublin"]), ("the Netherlands", ["Amsterdam"]),
    ("Belgium", ["Brussels", "Bruxelles"]), ("Switzerland", ["Bern", "Berne"]), ("Austria", ["Vienna", "Wien"]),
    ("Poland", ["Warsaw", "Warszawa"]), ("the Czech Republic", ["Prague", "Praha"]), ("Slovakia", ["Bratislava"]),
    ("Hungary", ["Budapest"]), ("Romania", ["Bucharest"]), ("Bulgaria", ["Sofia"]), ("Greece", ["Athens"]),
    ("Turkey", ["Ankara"]), ("Russia", ["Moscow"]), ("Ukraine", ["Kyiv", "Kiev"]), ("Belarus", ["Minsk"]),
    ("Lithuania", ["Vilnius"]), ("Latvia", ["Riga"]), ("Estonia", ["Tallinn"]), ("Finland", ["Helsinki"]),
    ("Sweden", ["Stockholm"]), ("Norway", ["Oslo"]), ("Denmark", ["Copenhagen"]), ("Iceland", ["Reykjavik"]),
    ("Serbia", ["Belgrade"]), ("Croatia", ["Zagreb"]), ("Slovenia", ["Ljubljana"]),
    ("Bosnia and Herzegovina", ["Sarajevo"]), ("Albania", ["Tirana"]), ("North Macedonia", ["Skopje"]),
    ("Montenegro", ["Podgorica"]), ("Moldova", ["Chisinau"]), ("Malta", ["Valletta"]), ("Cyprus", ["Nicosia"]),
    ("Georgia (the country)", ["Tbilisi"]), ("Armenia", ["Yerevan"]), ("Azerbaijan", ["Baku"]),
    ("Kazakhstan", ["Astana", "Nur-Sultan"]), ("Uzbekistan", ["Tashkent"]),
    ("Turkmenistan", ["Ashgabat", "Ashkhabad"]), ("Kyrgyzstan", ["Bishkek"]), ("Tajikistan", ["Dushanbe"]),
    ("Mongolia", ["Ulaanbaatar", "Ulan Bator"]), ("China", ["Beijing", "Peking"]), ("Japan", ["Tokyo"]),
    ("South Korea", ["Seoul"]), ("North Korea", ["Pyongyang"]), ("India", ["New Delhi"]),
    ("Pakistan", ["Islamabad"]), ("Bangladesh", ["Dhaka", "Dacca"]), ("Nepal", ["Kathmandu"]),
    ("Afghanistan", ["Kabul"]), ("Iran", ["Tehran", "Teheran"]), ("Iraq", ["Baghdad"]), ("Syria", ["Damascus"]),
    ("Lebanon", ["Beirut"]), ("Jordan", ["Amman"]), ("Saudi Arabia", ["Riyadh"]), ("Yemen", ["Sanaa", "Sana'a"]),
    ("Oman", ["Muscat"]), ("the United Arab Emirates", ["Abu Dhabi"]), ("Qatar", ["Doha"]),
    ("Kuwait", ["Kuwait City"]), ("Bahrain", ["Manama"]), ("Thailand", ["Bangkok"]), ("Vietnam", ["Hanoi"]),
    ("Cambodia", ["Phnom Penh"]), ("Laos", ["Vientiane"]), ("Myanmar", ["Naypyidaw", "Naypyitaw", "Nay Pyi Taw"]),
    ("Malaysia", ["Kuala Lumpur"]), ("Indonesia", ["Jakarta", "Nusantara"]), ("the Philippines", ["Manila"]),
    ("Egypt", ["Cairo"]), ("Libya", ["Tripoli"]), ("Tunisia", ["Tunis"]), ("Algeria", ["Algiers"]),
    ("Morocco", ["Rabat"]), ("Sudan", ["Khartoum"]), ("Ethiopia", ["Addis Ababa"]), ("Kenya", ["Nairobi"]),
    ("Uganda", ["Kampala"]), ("Tanzania", ["Dodoma"]), ("Rwanda", ["Kigali"]), ("Nigeria", ["Abuja"]),
    ("Ghana", ["Accra"]), ("Senegal", ["Dakar"]), ("Mali", ["Bamako"]), ("Niger", ["Niamey"]),
    ("Chad", ["N'Djamena", "Ndjamena"]), ("Cameroon", ["Yaounde", "Yaoundé"]), ("Angola", ["Luanda"]),
    ("Zambia", ["Lusaka"]), ("Zimbabwe", ["Harare"]), ("Mozambique", ["Maputo"]),
    ("Madagascar", ["Antananarivo"]), ("Botswana", ["Gaborone"]), ("Namibia", ["Windhoek"]),
    ("South Africa", ["Pretoria", "Cape Town", "Bloemfontein"]), ("Somalia", ["Mogadishu"]),
    ("the Democratic Republic of the Congo", ["Kinshasa"]), ("the United States", ["Washington", "Washington, D.C."]),
    ("Canada", ["Ottawa"]), ("Mexico", ["Mexico City"]), ("Cuba", ["Havana"]), ("Jamaica", ["Kingston"]),
    ("Haiti", ["Port-au-Prince"]), ("the Dominican Republic", ["Santo Domingo"]),
    ("Guatemala", ["Guatemala City"]), ("Honduras", ["Tegucigalpa"]), ("Nicaragua", ["Managua"]),
    ("Costa Rica", ["San Jose", "San José"]), ("Panama", ["Panama City"]), ("Colombia", ["Bogota", "Bogotá"]),
    ("Venezuela", ["Caracas"]), ("Ecuador", ["Quito"]), ("Peru", ["Lima"]), ("Bolivia", ["Sucre", "La Paz"]),
    ("Chile", ["Santiago"]), ("Argentina", ["Buenos Aires"]), ("Uruguay", ["Montevideo"]),
    ("Paraguay", ["Asuncion", "Asunción"]), ("Brazil", ["Brasilia", "Brasília"]), ("Australia", ["Canberra"]),
    ("New Zealand", ["Wellington"]), ("Papua New Guinea", ["Port Moresby"]), ("Fiji", ["Suva"]),
]

SYMBOLS = [
    ("gold", ["Au"]), ("silver", ["Ag"]), ("copper", ["Cu"]), ("lead", ["Pb"]), ("mercury", ["Hg"]),
    ("sodium", ["Na"]), ("potassium", ["K"]), ("tin", ["Sn"]), ("tungsten", ["W"]), ("hydrogen", ["H"]),
    ("helium", ["He"]), ("oxygen", ["O"]), ("nitrogen", ["N"]), ("carbon", ["C"]), ("calcium", ["Ca"]),
    ("chlorine", ["Cl"]), ("magnesium", ["Mg"]), ("zinc", ["Zn"]), ("phosphorus", ["P"]), ("fluorine", ["F"]),
    ("neon", ["Ne"]), ("argon", ["Ar"]), ("aluminium", ["Al"]), ("silicon", ["Si"]), ("uranium", ["U"]),
    ("plutonium", ["Pu"]), ("nickel", ["Ni"]), ("cobalt", ["Co"]), ("platinum", ["Pt"]), ("lithium", ["Li"]),
    ("boron", ["B"]), ("manganese", ["Mn"]), ("chromium", ["Cr"]), ("titanium", ["Ti"]), ("antimony", ["Sb"]),
    ("bismuth", ["Bi"]), ("radon", ["Rn"]), ("xenon", ["Xe"]), ("krypton", ["Kr"]), ("barium", ["Ba"]),
    ("strontium", ["Sr"]),
]

ATOMIC_NUMBERS = [("hydrogen", ["1", "one"]), ("helium", ["2", "two"]), ("carbon", ["6", "six"]),
                  ("oxygen", ["8", "eight"]), ("gold", ["79", "seventy-nine"]), ("iron", ["26", "twenty-six"])]

AUTHORS = [
    ("the novel Pride and Prejudice", ["Jane Austen", "Austen"]), ("Moby-Dick", ["Herman Melville", "Melville"]),
    ("the novel Nineteen Eighty-Four", ["George Orwell", "Orwell", "Eric Blair"]),
    ("War and Peace", ["Leo Tolstoy", "Tolstoy"]), ("Crime and Punishment", ["Fyodor Dostoevsky", "Dostoevsky", "Dostoyevsky"]),
    ("Don Quixote", ["Miguel de Cervantes", "Cervantes"]), ("The Divine Comedy", ["Dante Alighieri", "Dante"]),
    ("Romeo and Juliet", ["William Shakespeare", "Shakespeare"]), ("The Odyssey", ["Homer"]),
    ("The Great Gatsby", ["F. Scott Fitzgerald", "Fitzgerald"]), ("To Kill a Mockingbird", ["Harper Lee"]),
    ("The Catcher in the Rye", ["J. D. Salinger", "Salinger"]), ("Frankenstein", ["Mary Shelley", "Shelley"]),
    ("Dracula", ["Bram Stoker", "Stoker"]), ("Les Misérables", ["Victor Hugo", "Hugo"]),
    ("The Old Man and the Sea", ["Ernest Hemingway", "Hemingway"]),
    ("Adventures of Huckleberry Finn", ["Mark Twain", "Twain", "Samuel Clemens"]),
    ("Oliver Twist", ["Charles Dickens", "Dickens"]), ("Jane Eyre", ["Charlotte Brontë", "Charlotte Bronte"]),
    ("Wuthering Heights", ["Emily Brontë", "Emily Bronte"]), ("The Hobbit", ["J. R. R. Tolkien", "Tolkien"]),
    ("the Harry Potter books", ["J. K. Rowling", "Rowling"]), ("Brave New World", ["Aldous Huxley", "Huxley"]),
    ("Fahrenheit 451", ["Ray Bradbury", "Bradbury"]), ("On the Origin of Species", ["Charles Darwin", "Darwin"]),
    ("A Brief History of Time", ["Stephen Hawking", "Hawking"]),
    ("The Communist Manifesto", ["Karl Marx", "Marx", "Friedrich Engels", "Engels"]), ("The Republic", ["Plato"]),
    ("The Prince", ["Niccolò Machiavelli", "Machiavelli"]), ("Faust", ["Johann Wolfgang von Goethe", "Goethe"]),
    ("The Metamorphosis", ["Franz Kafka", "Kafka"]),
    ("One Hundred Years of Solitude", ["Gabriel García Márquez", "Garcia Marquez", "Marquez"]),
    ("The Little Prince", ["Antoine de Saint-Exupéry", "Saint-Exupery", "Exupery"]),
    ("Alice's Adventures in Wonderland", ["Lewis Carroll", "Carroll", "Charles Dodgson"]),
    ("Treasure Island", ["Robert Louis Stevenson", "Stevenson"]), ("The Time Machine", ["H. G. Wells", "Wells"]),
    ("Twenty Thousand Leagues Under the Seas", ["Jules Verne", "Verne"]),
    ("the Sherlock Holmes stories", ["Arthur Conan Doyle", "Conan Doyle", "Doyle"]),
    ("Gulliver's Travels", ["Jonathan Swift", "Swift"]), ("Robinson Crusoe", ["Daniel Defoe", "Defoe"]),
    ("Madame Bovary", ["Gustave Flaubert", "Flaubert"]), ("The Count of Monte Cristo", ["Alexandre Dumas", "Dumas"]),
    ("the novel Ulysses", ["James Joyce", "Joyce"]), ("Lolita", ["Vladimir Nabokov", "Nabokov"]),
    ("The Grapes of Wrath", ["John Steinbeck", "Steinbeck"]), ("the novel Beloved", ["Toni Morrison", "Morrison"]),
    ("The Handmaid's Tale", ["Margaret Atwood", "Atwood"]), ("Lord of the Flies", ["William Golding", "Golding"]),
    ("The Picture of Dorian Gray", ["Oscar Wilde", "Wilde"]), ("Little Women", ["Louisa May Alcott", "Alcott"]),
    ("Uncle Tom's Cabin", ["Harriet Beecher Stowe", "Stowe"]), ("the poem The Raven", ["Edgar Allan Poe", "Poe"]),
    ("Leviathan (1651)", ["Thomas Hobbes", "Hobbes"]), ("The Wealth of Nations", ["Adam Smith"]),
    ("The Canterbury Tales", ["Geoffrey Chaucer", "Chaucer"]), ("Paradise Lost", ["John Milton", "Milton"]),
    ("The Jungle Book", ["Rudyard Kipling", "Kipling"]), ("Peter Pan", ["J. M. Barrie", "Barrie"]),
    ("Winnie-the-Pooh", ["A. A. Milne", "Milne"]), ("The Chronicles of Narnia", ["C. S. Lewis", "Clive Staples Lewis"]),
    ("Charlie and the Chocolate Factory", ["Roald Dahl", "Dahl"]), ("The Da Vinci Code", ["Dan Brown"]),
    ("A Game of Thrones", ["George R. R. Martin", "R. R. Martin"]), ("Things Fall Apart", ["Chinua Achebe", "Achebe"]),
    ("The Stranger (L'Étranger)", ["Albert Camus", "Camus"]), ("In Search of Lost Time", ["Marcel Proust", "Proust"]),
    ("Candide", ["Voltaire"]), ("The Art of War", ["Sun Tzu", "Sunzi"]),
    ("Thus Spoke Zarathustra", ["Friedrich Nietzsche", "Nietzsche"]),
    ("Critique of Pure Reason", ["Immanuel Kant", "Kant"]),
]

ASTRONOMY = [
    ("What is the largest planet in the Solar System?", ["Jupiter"]),
    ("Which planet is closest to the Sun?", ["Mercury"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("Which planet is famous for its large, bright rings?", ["Saturn"]),
    ("Which planet has the hottest surface in the Solar System?", ["Venus"]),
    ("Which planet is farthest from the Sun?", ["Neptune"]),
    ("Which planet is third from the Sun?", ["Earth"]),
    ("How many planets are in the Solar System?", ["8", "eight"]),
    ("What is the smallest planet in the Solar System?", ["Mercury"]),
    ("Which planet rotates on its side, with an axial tilt of about 98 degrees?", ["Uranus"]),
    ("What is the name of Earth's natural satellite?", ["Moon", "Luna"]),
    ("What star is at the centre of the Solar System?", ["Sun", "Sol"]),
    ("What is the largest moon of Saturn?", ["Titan"]),
    ("What is the largest moon of Jupiter?", ["Ganymede"]),
    ("Who was the first person to walk on the Moon?", ["Neil Armstrong", "Armstrong"]),
    ("Who was the first human to travel into space?", ["Yuri Gagarin", "Gagarin"]),
    ("Which former ninth planet was reclassified as a dwarf planet in 2006?", ["Pluto"]),
    ("What is the name of the galaxy that contains the Solar System?", ["Milky Way"]),
    ("What is the nearest star to the Sun?", ["Proxima Centauri", "Proxima"]),
    ("Which planet has the Great Red Spot?", ["Jupiter"]),
    ("Which planet is often called the Morning Star or Evening Star?", ["Venus"]),
    ("What was the name of the first artificial satellite?", ["Sputnik", "Sputnik 1"]),
    ("Which space telescope was launched in 1990 aboard the Space Shuttle Discovery?", ["Hubble"]),
    ("Who proposed the heliocentric model of the Solar System in the 16th century?", ["Nicolaus Copernicus", "Copernicus"]),
    ("Who discovered the four largest moons of Jupiter in 1610?", ["Galileo Galilei", "Galileo"]),
]

SCIENCE = [
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe to survive?", ["oxygen", "O2"]),
    ("What is the chemical formula of water?", ["H2O"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["100", "one hundred"]),
    ("What is the freezing point of water in degrees Fahrenheit?", ["32", "thirty-two"]),
    ("How many bones are in the adult human body?", ["206"]),
    ("What is the largest organ of the human body?", ["skin"]),
    ("What organ pumps blood through the human body?", ["heart"]),
    ("Which part of the cell is known as its powerhouse?", ["mitochondria", "mitochondrion"]),
    ("What is the hardest natural substance?", ["diamond"]),
    ("What is the SI unit of electrical resistance?", ["ohm"]),
    ("What is the SI unit of force?", ["newton"]),
    ("What is the SI unit of power?", ["watt"]),
    ("What is the SI unit of frequency?", ["hertz", "Hz"]),
    ("What is the SI unit of electric current?", ["ampere", "amp"]),
    ("What is the SI unit of energy?", ["joule"]),
    ("Who developed the theory of general relativity?", ["Albert Einstein", "Einstein"]),
    ("Who formulated the three laws of motion and universal gravitation?", ["Isaac Newton", "Newton"]),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"]),
    ("Who proposed the theory of evolution by natural selection?", ["Charles Darwin", "Darwin", "Alfred Russel Wallace"]),
    ("Who created the first widely recognised periodic table of the elements?", ["Dmitri Mendeleev", "Mendeleev", "Mendeleyev"]),
    ("Who discovered the elements polonium and radium?", ["Marie Curie", "Curie"]),
    ("Who is known as the father of genetics for his experiments with pea plants?", ["Gregor Mendel", "Mendel"]),
    ("What is the most abundant gas in Earth's atmosphere?", ["nitrogen"]),
    ("What is the pH of pure water at 25 degrees Celsius?", ["7", "seven"]),
    ("What is the chemical formula of table salt?", ["NaCl"]),
    ("What is the chemical name of table salt?", ["sodium chloride"]),
    ("Which subatomic particle has a negative electric charge?", ["electron"]),
    ("Which positively charged particle is found in the nucleus of an atom?", ["proton"]),
    ("Which subatomic particle has no electric charge?", ["neutron"]),
    ("What force keeps us on the ground?", ["gravity", "gravitation"]),
    ("What is the scientific study of living things called?", ["biology"]),
    ("What class of animal does a whale belong to?", ["mammal", "Mammalia"]),
    ("How many chambers does the human heart have?", ["4", "four"]),
    ("What is the largest mammal on Earth?", ["blue whale"]),
    ("Which blood cells carry oxygen around the body?", ["red blood cells", "red blood cell", "erythrocytes", "red cells"]),
    ("What is the most abundant element in the Sun?", ["hydrogen"]),
    ("What is absolute zero in degrees Celsius?", ["-273.15", "-273", "273.15", "273"]),
    ("Which vitamin does the skin produce when exposed to sunlight?", ["vitamin D", "D3"]),
    ("What is the process by which plants use light to make food?", ["photosynthesis"]),
    ("What is H2O commonly called?", ["water"]),
    ("How many chromosomes does a typical human cell have?", ["46", "forty-six", "23 pairs"]),
    ("What is the longest bone in the human body?", ["femur", "thigh bone", "thighbone"]),
    ("What is the smallest unit of life?", ["cell"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    ("What is the most abundant element in the universe?", ["hydrogen"]),
    ("What gas do plants release during photosynthesis?", ["oxygen", "O2"]),
    ("Which blood type is known as the universal donor?", ["O negative", "O neg", "O Rh negative"]),
    ("What is Newton's first law of motion also called?", ["law of inertia", "inertia"]),
    ("What does DNA stand for?", ["deoxyribonucleic acid"]),
    ("What is the central part of an atom called?", ["nucleus"]),
    ("What is the SI base unit of mass?", ["kilogram", "kg"]),
    ("How many degrees are in a right angle?", ["90", "ninety"]),
    ("What is the sum of the interior angles of a triangle in degrees?", ["180", "one hundred eighty", "one hundred and eighty"]),
    ("What is the value of pi to two decimal places?", ["3.14"]),
    ("What is the square root of 144?", ["12", "twelve"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("How many sides does an octagon have?", ["8", "eight"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many days are in a leap year?", ["366"]),
    ("How many continents are there on Earth?", ["7", "seven"]),
    ("What is the largest internal organ of the human body?", ["liver"]),
    ("How many teeth does an adult human normally have?", ["32", "thirty-two"]),
    ("How many centimetres are in a metre?", ["100", "one hundred"]),
    ("How many grams are in a kilogram?", ["1000", "1,000", "one thousand"]),
    ("At what temperature in degrees Celsius does water freeze?", ["0", "zero"]),
    ("What is the approximate speed of light in kilometres per second?", ["300,000", "300000", "299,792", "299792"]),
]

YEARS = [
    ("World War II end", "In which year did World War II end?", "1945"),
    ("World War I start", "In which year did World War I begin?", "1914"),
    ("World War I end", "In which year did World War I end?", "1918"),
    ("World War II start", "In which year did World War II begin?", "1939"),
    ("Berlin Wall fall", "In which year did the Berlin Wall fall?", "1989"),
    ("Moon landing", "In which year did humans first land on the Moon?", "1969"),
    ("US independence", "In which year was the United States Declaration of Independence adopted?", "1776"),
    ("French Revolution", "In which year did the French Revolution begin?", "1789"),
    ("Columbus", "In which year did Christopher Columbus first reach the Americas?", "1492"),
    ("Titanic", "In which year did the Titanic sink?", "1912"),
    ("Hastings", "In which year was the Battle of Hastings?", "1066"),
    ("Magna Carta", "In which year was the Magna Carta sealed?", "1215"),
    ("USSR", "In which year did the Soviet Union dissolve?", "1991"),
    ("Mandela", "In which year was Nelson Mandela released from prison?", "1990"),
    ("9/11", "In which year did the September 11 attacks take place?", "2001"),
    ("JFK", "In which year was John F. Kennedy assassinated?", "1963"),
    ("Pearl Harbor", "In which year did Japan attack Pearl Harbor?", "1941"),
    ("Russian Revolution", "In which year did the Russian Revolution take place?", "1917"),
    ("US Civil War start", "In which year did the American Civil War begin?", "1861"),
    ("US Civil War end", "In which year did the American Civil War end?", "1865"),
    ("Great Fire", "In which year was the Great Fire of London?", "1666"),
    ("iPhone", "In which year was the first iPhone released?", "2007"),
    ("Wright", "In which year did the Wright brothers make their first powered flight?", "1903"),
    ("Chernobyl", "In which year did the Chernobyl nuclear disaster happen?", "1986"),
    ("Waterloo", "In which year was the Battle of Waterloo?", "1815"),
    ("Luther", "In which year did Martin Luther publish his Ninety-five Theses?", "1517"),
    ("Constantinople", "In which year did Constantinople fall to the Ottoman Empire?", "1453"),
    ("India", "In which year did India gain independence from British rule?", "1947"),
    ("PRC", "In which year was the People's Republic of China founded?", "1949"),
    ("UN", "In which year was the United Nations founded?", "1945"),
    ("Versailles", "In which year was the Treaty of Versailles signed?", "1919"),
    ("Wall Street", "In which year did the Wall Street Crash happen?", "1929"),
    ("Victoria", "In which year did Queen Victoria's reign begin?", "1837"),
    ("Sputnik", "In which year did the Soviet Union launch Sputnik 1?", "1957"),
    ("Cuban crisis", "In which year did the Cuban Missile Crisis take place?", "1962"),
    ("Reunification", "In which year was Germany reunified?", "1990"),
    ("Brexit", "In which year did the United Kingdom hold its referendum on leaving the European Union?", "2016"),
    ("Katrina", "In which year did Hurricane Katrina strike New Orleans?", "2005"),
    ("Armada", "In which year was the Spanish Armada defeated?", "1588"),
    ("UDHR", "In which year was the Universal Declaration of Human Rights adopted?", "1948"),
    ("Elizabeth II", "In which year did Elizabeth II become queen?", "1952"),
    ("Eiffel", "In which year was the Eiffel Tower completed?", "1889"),
    ("MLK", "In which year was Martin Luther King Jr. assassinated?", "1968"),
    ("Hong Kong", "In which year was Hong Kong handed over to China?", "1997"),
    ("Challenger", "In which year did the Space Shuttle Challenger disaster happen?", "1986"),
    ("Google", "In which year was Google founded?", "1998"),
    ("Gagarin", "In which year did Yuri Gagarin fly into space?", "1961"),
    ("Berlin Wall built", "In which year was the Berlin Wall built?", "1961"),
    ("Korean War", "In which year did the Korean War begin?", "1950"),
    ("Hiroshima", "In which year was the atomic bomb dropped on Hiroshima?", "1945"),
]
EURO = ("In which year was the euro introduced as a currency?", ["1999", "2002"])

PEOPLE = [
    ("Who was the first President of the United States?", ["George Washington", "Washington"]),
    ("Who was the 16th President of the United States?", ["Abraham Lincoln", "Lincoln"]),
    ("Who was the British Prime Minister for most of World War II?", ["Winston Churchill", "Churchill"]),
    ("Who was the first Roman emperor?", ["Augustus", "Octavian", "Caesar Augustus"]),
    ("Which French emperor was defeated at the Battle of Waterloo?", ["Napoleon", "Bonaparte"]),
    ("Who led the Soviet Union during World War II?", ["Joseph Stalin", "Stalin"]),
    ("Who led India's non-violent independence movement against British rule?", ["Mahatma Gandhi", "Gandhi"]),
    ("Who was the first woman to win a Nobel Prize?", ["Marie Curie", "Curie"]),
    ("Which queen ruled England from 1558 to 1603?", ["Elizabeth I", "Elizabeth the First"]),
    ("Which queen of Egypt was allied with Mark Antony?", ["Cleopatra"]),
    ("Who founded the Mongol Empire?", ["Genghis Khan", "Chinggis Khan", "Temujin"]),
    ("Whose expedition made the first circumnavigation of the Earth?", ["Ferdinand Magellan", "Magellan", "Elcano"]),
    ("Which king of Macedon conquered the Persian Empire?", ["Alexander the Great", "Alexander"]),
    ("Who was the principal author of the United States Declaration of Independence?", ["Thomas Jefferson", "Jefferson"]),
    ("Who was South Africa's first Black president?", ["Nelson Mandela", "Mandela"]),
    ("Which Soviet leader introduced the policies of glasnost and perestroika?", ["Mikhail Gorbachev", "Gorbachev"]),
    ("Who was the first female Prime Minister of the United Kingdom?", ["Margaret Thatcher", "Thatcher"]),
    ("Who gave the 'I Have a Dream' speech in 1963?", ["Martin Luther King", "MLK"]),
    ("Which explorer led the 1492 voyage across the Atlantic for Spain?", ["Christopher Columbus", "Columbus"]),
]

CREATIONS = [
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Leonardo", "da Vinci"]),
    ("Who painted The Starry Night?", ["Vincent van Gogh", "van Gogh"]),
    ("Who painted the ceiling of the Sistine Chapel?", ["Michelangelo"]),
    ("Who painted Guernica?", ["Pablo Picasso", "Picasso"]),
    ("Who painted The Persistence of Memory, with its melting clocks?", ["Salvador Dalí", "Salvador Dali", "Dali"]),
    ("Who painted The Scream?", ["Edvard Munch", "Munch"]),
    ("Who painted Girl with a Pearl Earring?", ["Johannes Vermeer", "Vermeer"]),
    ("Who painted The Last Supper in Milan?", ["Leonardo da Vinci", "Leonardo", "da Vinci"]),
    ("Who painted the Water Lilies series?", ["Claude Monet", "Monet"]),
    ("Who painted The Birth of Venus?", ["Sandro Botticelli", "Botticelli"]),
    ("Who painted The Night Watch?", ["Rembrandt"]),
    ("Who sculpted the marble statue of David in Florence?", ["Michelangelo"]),
    ("Who sculpted The Thinker?", ["Auguste Rodin", "Rodin"]),
    ("Who composed the Moonlight Sonata?", ["Ludwig van Beethoven", "Beethoven"]),
    ("Who composed the opera The Magic Flute?", ["Wolfgang Amadeus Mozart", "Mozart"]),
    ("Who composed The Four Seasons violin concertos?", ["Antonio Vivaldi", "Vivaldi"]),
    ("Who composed the ballet Swan Lake?", ["Pyotr Ilyich Tchaikovsky", "Tchaikovsky"]),
    ("Who composed the Brandenburg Concertos?", ["Johann Sebastian Bach", "Bach"]),
    ("Who composed the oratorio Messiah?", ["George Frideric Handel", "Handel"]),
    ("Who composed the opera The Barber of Seville?", ["Gioachino Rossini", "Rossini"]),
    ("Who composed Clair de lune?", ["Claude Debussy", "Debussy"]),
    ("Who composed Boléro?", ["Maurice Ravel", "Ravel"]),
    ("Who composed the waltz The Blue Danube?", ["Johann Strauss", "Strauss"]),
    ("Who composed the opera Carmen?", ["Georges Bizet", "Bizet"]),
    ("Who composed the opera La traviata?", ["Giuseppe Verdi", "Verdi"]),
    ("Who is credited with inventing the telephone?", ["Alexander Graham Bell", "Graham Bell", "Bell"]),
    ("Who is credited with inventing the practical incandescent light bulb?", ["Thomas Edison", "Edison", "Joseph Swan"]),
    ("Who invented the World Wide Web?", ["Tim Berners-Lee", "Berners-Lee"]),
    ("Who introduced the movable-type printing press to Europe?", ["Johannes Gutenberg", "Gutenberg"]),
    ("Who invented dynamite?", ["Alfred Nobel", "Nobel"]),
    ("Who made the first controlled, powered aeroplane flight?", ["Wright brothers", "Orville Wright", "Wilbur Wright", "Wright"]),
    ("Who is credited with inventing radio telegraphy?", ["Guglielmo Marconi", "Marconi"]),
    ("Who improved the steam engine with a separate condenser in 1765?", ["James Watt", "Watt"]),
    ("Who invented the alternating-current induction motor?", ["Nikola Tesla", "Tesla"]),
    ("Who developed the first successful polio vaccine?", ["Jonas Salk", "Salk"]),
    ("Who co-founded Microsoft with Paul Allen?", ["Bill Gates", "Gates"]),
    ("Who co-founded Apple with Steve Wozniak?", ["Steve Jobs", "Jobs"]),
    ("Who founded Facebook?", ["Mark Zuckerberg", "Zuckerberg"]),
    ("Who founded Amazon?", ["Jeff Bezos", "Bezos"]),
]

GEOGRAPHY = [
    ("What is the longest river in the world?", ["Nile", "Amazon"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the largest hot desert in the world?", ["Sahara"]),
    ("What is the tallest mountain in the world above sea level?", ["Mount Everest", "Everest"]),
    ("What is the largest country in the world by area?", ["Russia"]),
    ("What is the smallest country in the world by area?", ["Vatican City", "Vatican"]),
    ("What is the largest continent?", ["Asia"]),
    ("What is the smallest continent?", ["Australia", "Oceania"]),
    ("On which continent is Egypt?", ["Africa"]),
    ("On which continent is Brazil?", ["South America"]),
    ("In which country is the Great Pyramid of Giza?", ["Egypt"]),
    ("In which city is the Eiffel Tower?", ["Paris"]),
    ("In which city is the Colosseum?", ["Rome"]),
    ("In which city is the Statue of Liberty?", ["New York"]),
    ("In which city is Big Ben?", ["London"]),
    ("In which city is the Taj Mahal?", ["Agra"]),
    ("In which city is the Kremlin?", ["Moscow"]),
    ("In which country is the Sydney Opera House?", ["Australia"]),
    ("In which country is Machu Picchu?", ["Peru"]),
    ("In which city is the Christ the Redeemer statue?", ["Rio de Janeiro", "Rio"]),
    ("In which city is the Acropolis?", ["Athens"]),
    ("In which country is the Great Wall?", ["China"]),
    ("In which country is Angkor Wat?", ["Cambodia"]),
    ("In which country is the ancient city of Petra?", ["Jordan"]),
    ("In which country is Mount Kilimanjaro?", ["Tanzania"]),
    ("Niagara Falls lies on the border between the United States and which country?", ["Canada"]),
    ("Which river flows through Paris?", ["Seine"]),
    ("Which river flows through London?", ["Thames"]),
    ("Which river flows through Cairo?", ["Nile"]),
    ("Which river flows through Baghdad?", ["Tigris"]),
    ("Which river flows through Vienna and Budapest?", ["Danube"]),
    ("What is the largest lake in Africa?", ["Lake Victoria", "Victoria"]),
    ("What is the deepest oceanic trench on Earth?", ["Mariana Trench", "Marianas Trench", "Mariana"]),
    ("What is the largest island in the world?", ["Greenland"]),
    ("Which ocean lies between Africa and Australia?", ["Indian"]),
    ("What is the longest continental mountain range in the world?", ["Andes"]),
    ("What is the highest waterfall in the world?", ["Angel Falls", "Salto Angel"]),
    ("What is the largest rainforest in the world?", ["Amazon"]),
    ("Which European country is shaped like a boot?", ["Italy"]),
    ("Which US state is the largest by area?", ["Alaska"]),
    ("In which US state is Hollywood?", ["California"]),
    ("What is the official language of Brazil?", ["Portuguese"]),
    ("What is the official language of Argentina?", ["Spanish"]),
    ("What is the official language of Egypt?", ["Arabic"]),
    ("What is the official language of Iran?", ["Persian", "Farsi"]),
    ("What is the official language of the Netherlands?", ["Dutch"]),
    ("What is the official language of Austria?", ["German"]),
    ("What is the official language of Japan?", ["Japanese"]),
    ("What is the main language spoken in Quebec?", ["French"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the currency of the United Kingdom?", ["pound", "pound sterling", "sterling"]),
    ("What is the currency of Germany?", ["euro"]),
    ("What is the currency of the United States?", ["dollar", "US dollar"]),
    ("What is the currency of India?", ["rupee"]),
    ("What is the currency of Russia?", ["ruble", "rouble"]),
    ("What is the currency of China?", ["yuan", "renminbi", "RMB"]),
    ("What is the currency of Switzerland?", ["franc", "Swiss franc"]),
    ("What is the currency of Mexico?", ["peso"]),
    ("What is the currency of Turkey?", ["lira"]),
    ("What is the currency of South Africa?", ["rand"]),
    ("What is the currency of Poland?", ["zloty", "złoty"]),
    ("What is the currency of Sweden?", ["krona", "kronor"]),
    ("What is the currency of Thailand?", ["baht"]),
    ("What is the currency of Israel?", ["shekel", "new shekel"]),
]

MISC = [
    ("What is the fastest land animal?", ["cheetah"]),
    ("What is the largest living bird?", ["ostrich"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many legs does an insect have?", ["6", "six"]),
    ("What sweet substance do bees make?", ["honey"]),
    ("What is a baby kangaroo called?", ["joey"]),
    ("What is a group of lions called?", ["pride"]),
    ("What is the tallest living animal?", ["giraffe"]),
    ("What do giant pandas mainly eat?", ["bamboo"]),
    ("Which sport uses a shuttlecock?", ["badminton"]),
    ("How many players does a football (soccer) team have on the field?", ["11", "eleven"]),
    ("How many rings are on the Olympic flag?", ["5", "five"]),
    ("In which board game can a player be checkmated?", ["chess"]),
    ("How many strings does a standard guitar have?", ["6", "six"]),
    ("How many keys does a standard piano have?", ["88", "eighty-eight"]),
    ("What colour do you get by mixing blue and yellow paint?", ["green"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the tallest building in the world?", ["Burj Khalifa"]),
    ("Which instrument has 88 keys?", ["piano", "pianoforte"]),
    ("What fruit is the main ingredient of guacamole?", ["avocado"]),
    ("How many players does a basketball team have on the court?", ["5", "five"]),
    ("What is the largest species of shark?", ["whale shark"]),
    ("What is the only mammal capable of true flight?", ["bat"]),
    ("What is the primary food of koalas?", ["eucalyptus", "eucalyptus leaves", "gum leaves"]),
    ("Which bird is a symbol of peace?", ["dove"]),
    ("How many days are in a week?", ["7", "seven"]),
    ("What is the main ingredient of hummus?", ["chickpeas", "chickpea", "garbanzo beans"]),
    ("In which city were the first modern Olympic Games held in 1896?", ["Athens"]),
]


def build() -> list[QAItem]:
    rows: list[tuple[str, str, list[str]]] = []
    rows += [("capital", f"What is the capital of {c}?", a) for c, a in CAPITALS]
    rows += [("chemical_symbol", f"What is the chemical symbol for {e}?", a) for e, a in SYMBOLS]
    rows += [("atomic_number", f"What is the atomic number of {e}?", a) for e, a in ATOMIC_NUMBERS]
    rows += [("author", f"Who wrote {w}?", a) for w, a in AUTHORS]
    rows += [("astronomy", q, a) for q, a in ASTRONOMY]
    rows += [("science", q, a) for q, a in SCIENCE]
    rows += [("date", q, [y]) for _, q, y in YEARS] + [("date", EURO[0], EURO[1])]
    rows += [("person", q, a) for q, a in PEOPLE]
    rows += [("art_music_invention", q, a) for q, a in CREATIONS]
    rows += [("geography", q, a) for q, a in GEOGRAPHY]
    rows += [("misc", q, a) for q, a in MISC]
    shots = {normalize_answer(q) for q, _ in DEFAULT_SHOTS}
    counts: dict[str, int] = {}
    items = []
    for cat, q, a in rows:
        if normalize_answer(q) in shots:
            raise ValueError(f"{q!r} is one of the answer prompt's few-shot examples")
        counts[cat] = counts.get(cat, 0) + 1
        items.append(QAItem(f"{cat}-{counts[cat]:03d}", q, tuple(a), cat))
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    items = build()
    write_qa(args.out, items)  # checks ids, duplicates and aliases leaking into questions
    by_cat: dict[str, int] = {}
    for it in items:
        by_cat[it.category] = by_cat.get(it.category, 0) + 1
    print(f"{len(items)} questions -> {args.out}")
    for cat, n in by_cat.items():
        print(f"  {cat:22s} {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
