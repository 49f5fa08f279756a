"""Build the SmolLM2 knowledge-editing fact set: facts the model knows, with paraphrases and neighbourhoods.

Candidate facts are (relation, subject, answer) triples grouped by answer: "Osaka is a city in the country of"
-> Japan shares its relation and answer with Kyoto, Nagoya, ... Every prompt is checked on the model as a
plain-text continuation: a prompt *passes* when the greedy continuation starts with the answer's tokens
(teacher-forced argmax of every answer token, :func:`workbench.surgery.metrics.score_pairs`, which is the same
thing). Within each answer group, the passing subjects are split into

- *facts* (the first ``--facts-per-group`` that pass on the edit prompt and on at least ``--min-paraphrases``
  paraphrases), which become edit requests, and
- *neighbours* (the next ``--neighbors`` passing subjects, never edited), whose prompts are the request's
  locality / neighbourhood prompts with the true answer,

so a neighbourhood prompt is never itself the subject of another request (sequential edits stay clean).
``target_new`` is the answer of another group of the same relation (a plausible wrong answer of the same type).
Landmark and city facts get a portability prompt (the country / continent implied by the new answer).

    .venv/bin/python experiments/build_facts.py

writes experiments/data/smollm2_facts.jsonl (EasyEdit field names, read by
``workbench.surgery.requests.load_requests``) and experiments/results/editing/facts_build.json (every check:
each candidate prompt, pass or fail, and the model's greedy tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from provenance import provenance, write_json  # experiments/ is the script's folder

# relation -> (edit template, paraphrase templates, neighbourhood template); "{}" is the subject as written
RELATIONS = {
    "city_country": ("{} is located in the country of",
                     ["{} is a city located in the country of", "{} is a city in the country of",
                      "The city of {} is in", "{} is a city in"],
                     "{} is located in the country of"),
    "landmark_city": ("{} is in the city of",
                      ["{} is a famous landmark in the city of", "{} is located in the city of",
                       "{} can be found in the city of", "{} is located in"],
                      "{} is in the city of"),
    "country_language": ("In {}, the official language is",
                         ["People in {} speak", "The official language of {} is",
                          "The main language spoken in {} is"],
                         "In {}, the official language is"),
    "country_continent": ("{} is located in the continent of",
                          ["{} is a country in the continent of", "{} is a country in",
                           "The country of {} is part of the continent of"],
                          "{} is located in the continent of"),
    "company_country": ("The company {} was founded in the country of",
                        ["{} is headquartered in the country of", "{} is a company from",
                         "{} is a company based in"],
                        "The company {} was founded in the country of"),
    "dish_country": ("{} comes from the country of",
                     ["{} is a traditional dish from", "{} is a dish that originated in",
                      "{} is a famous food from the country of"],
                     "{} comes from the country of"),
}

# (relation, answer) -> subjects in the order tried (facts first); "the " marks an article before the subject
GROUPS: dict[tuple[str, str], list[str]] = {
    ("city_country", "Japan"): ["Osaka", "Kyoto", "Yokohama", "Nagoya", "Hiroshima", "Sapporo", "Kobe", "Fukuoka",
                                "Nara", "Sendai", "Kawasaki", "Saitama", "Chiba", "Okayama", "Kumamoto",
                                "Kagoshima", "Niigata", "Shizuoka", "Nagasaki", "Kanazawa", "Hakodate",
                                "Matsuyama", "Kitakyushu", "Hamamatsu", "Utsunomiya", "Tokyo"],
    ("city_country", "France"): ["Lyon", "Marseille", "Bordeaux", "Toulouse", "Nice", "Strasbourg", "Lille",
                                 "Nantes", "Montpellier", "Rennes", "Reims", "Grenoble", "Dijon", "Le Havre",
                                 "Avignon", "Cannes", "Toulon", "Brest", "Angers", "Metz", "Clermont-Ferrand",
                                 "Perpignan", "Limoges", "Rouen", "Paris"],
    ("city_country", "Germany"): ["Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden",
                                  "Düsseldorf", "Leipzig", "Hanover", "Bremen", "Nuremberg", "Bonn", "Heidelberg",
                                  "Mannheim", "Essen", "Dortmund", "Freiburg", "Augsburg", "Karlsruhe",
                                  "Wiesbaden", "Münster", "Kiel", "Rostock", "Potsdam", "Aachen", "Berlin"],
    ("city_country", "Italy"): ["Milan", "Naples", "Florence", "Turin", "Venice", "Bologna", "Palermo", "Genoa",
                                "Verona", "Pisa", "Bari", "Catania", "Rome"],
    ("city_country", "Spain"): ["Barcelona", "Seville", "Valencia", "Bilbao", "Malaga", "Granada", "Zaragoza",
                                "Cordoba", "Alicante", "Pamplona", "Salamanca", "Madrid"],
    ("city_country", "China"): ["Shanghai", "Guangzhou", "Shenzhen", "Wuhan", "Chengdu", "Nanjing", "Hangzhou",
                                "Tianjin", "Chongqing", "Xi'an", "Suzhou", "Harbin", "Qingdao", "Dalian",
                                "Shenyang", "Kunming", "Xiamen", "Zhengzhou", "Changsha", "Jinan", "Fuzhou",
                                "Hefei", "Nanning", "Guiyang", "Lanzhou", "Urumqi", "Lhasa", "Ningbo", "Wuxi",
                                "Beijing"],
    ("city_country", "India"): ["Mumbai", "Bangalore", "Kolkata", "Chennai", "Hyderabad", "Pune", "Jaipur",
                                "Ahmedabad", "Lucknow", "Surat", "Kanpur", "Nagpur", "Indore", "Bhopal", "Patna",
                                "Varanasi", "Amritsar", "Mysore", "Coimbatore", "Kochi", "Visakhapatnam",
                                "Madurai", "Ranchi", "Dehradun", "Chandigarh", "Srinagar", "Delhi"],
    ("city_country", "Russia"): ["Novosibirsk", "Kazan", "Yekaterinburg", "Vladivostok", "Sochi",
                                 "Saint Petersburg", "Omsk", "Samara", "Murmansk", "Irkutsk", "Perm", "Volgograd", "Rostov-on-Don",
                                 "Ufa", "Krasnoyarsk", "Chelyabinsk", "Voronezh", "Moscow"],
    ("city_country", "Canada"): ["Toronto", "Vancouver", "Montreal", "Calgary", "Edmonton", "Winnipeg", "Halifax",
                                 "Quebec City", "Regina", "Saskatoon", "Victoria", "Hamilton", "Mississauga", "Kitchener",
                                 "Whitehorse", "Yellowknife", "Ottawa"],
    ("city_country", "Australia"): ["Melbourne", "Brisbane", "Perth", "Adelaide", "Canberra", "Hobart",
                                    "Darwin", "Gold Coast", "Cairns", "Sydney"],
    ("city_country", "Brazil"): ["Rio de Janeiro", "São Paulo", "Salvador", "Recife", "Fortaleza", "Manaus",
                                 "Curitiba", "Brasília", "Belo Horizonte", "Porto Alegre"],
    ("city_country", "Turkey"): ["Istanbul", "Ankara", "Izmir", "Antalya", "Bursa", "Konya", "Adana"],
    ("city_country", "Poland"): ["Krakow", "Gdansk", "Wroclaw", "Poznan", "Warsaw", "Lodz", "Lublin"],
    ("city_country", "Mexico"): ["Guadalajara", "Monterrey", "Cancun", "Tijuana", "Puebla", "Acapulco",
                                 "Mexico City", "Oaxaca"],
    ("landmark_city", "Paris"): ["the Eiffel Tower", "the Louvre", "the Arc de Triomphe", "the Champs-Élysées",
                                 "Notre-Dame Cathedral", "the Sacré-Cœur", "the Musée d'Orsay", "the Pont Neuf",
                                 "the Centre Pompidou", "the Place de la Concorde"],
    ("landmark_city", "Rome"): ["the Colosseum", "the Trevi Fountain", "the Pantheon", "the Roman Forum",
                                "the Spanish Steps", "the Circus Maximus", "the Baths of Caracalla",
                                "the Palatine Hill", "Piazza Navona"],
    ("landmark_city", "London"): ["Big Ben", "Buckingham Palace", "Tower Bridge", "the British Museum",
                                  "Westminster Abbey", "the London Eye", "Trafalgar Square", "the Tower of London",
                                  "Hyde Park", "St Paul's Cathedral", "Piccadilly Circus", "the Houses of Parliament"],
    ("landmark_city", "New York"): ["the Statue of Liberty", "the Empire State Building", "Central Park",
                                    "Times Square", "the Brooklyn Bridge", "Wall Street", "the Chrysler Building",
                                    "Broadway", "Rockefeller Center", "the Metropolitan Museum of Art",
                                    "the Guggenheim Museum"],
    ("landmark_city", "Moscow"): ["the Kremlin", "Red Square", "the Bolshoi Theatre", "Saint Basil's Cathedral",
                                  "Gorky Park", "the Moscow Metro"],
    ("landmark_city", "Berlin"): ["the Brandenburg Gate", "the Reichstag", "Checkpoint Charlie",
                                  "Alexanderplatz", "the Berlin Wall Memorial", "Museum Island"],
    ("landmark_city", "Athens"): ["the Acropolis", "the Parthenon", "the Temple of Olympian Zeus",
                                  "the Erechtheion", "the Panathenaic Stadium"],
    ("landmark_city", "Barcelona"): ["the Sagrada Familia", "Park Güell", "Camp Nou", "La Rambla",
                                     "Casa Batlló", "the Gothic Quarter"],
    ("country_language", "Spanish"): ["Mexico", "Argentina", "Colombia", "Peru", "Chile", "Venezuela", "Cuba",
                                      "Ecuador", "Uruguay", "Bolivia", "Paraguay", "Guatemala", "Honduras",
                                      "Nicaragua", "Costa Rica", "Panama", "El Salvador", "the Dominican Republic",
                                      "Equatorial Guinea", "Spain"],
    ("country_language", "Portuguese"): ["Brazil", "Portugal", "Angola", "Mozambique", "Cape Verde",
                                         "Guinea-Bissau"],
    ("country_language", "Arabic"): ["Saudi Arabia", "Egypt", "Iraq", "Syria", "Jordan", "Yemen", "Oman",
                                     "Kuwait", "Qatar", "Libya", "Morocco", "Algeria", "Tunisia", "Lebanon",
                                     "Bahrain", "Sudan", "the United Arab Emirates", "Mauritania"],
    ("country_language", "German"): ["Germany", "Austria", "Liechtenstein"],
    ("country_language", "French"): ["France", "Senegal", "Monaco", "Haiti"],
    ("country_continent", "Africa"): ["Nigeria", "Kenya", "Ghana", "Ethiopia", "Tanzania", "Uganda", "Zambia",
                                      "Cameroon", "Mali", "Rwanda", "Malawi", "Botswana", "Namibia", "Zimbabwe",
                                      "Niger", "Chad", "Somalia", "Senegal", "Ivory Coast", "Mozambique",
                                      "Madagascar", "Burkina Faso", "Benin", "Togo", "Sierra Leone", "Liberia",
                                      "Gabon", "Eritrea"],
    ("country_continent", "Europe"): ["Sweden", "Norway", "Poland", "Hungary", "Belgium", "Finland", "Denmark",
                                      "Switzerland", "Greece", "Romania", "Bulgaria", "Croatia", "Ireland",
                                      "the Netherlands", "Slovakia", "Slovenia", "Serbia", "Estonia", "Latvia",
                                      "Lithuania", "Iceland", "Luxembourg", "Ukraine", "Albania", "France", "Italy"],
    ("country_continent", "South America"): ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Bolivia",
                                             "Uruguay", "Paraguay", "Venezuela", "Ecuador"],
    ("company_country", "Japan"): ["Sony", "Nintendo", "Mitsubishi", "Nissan", "Yamaha", "Suzuki", "Toyota",
                                   "Honda", "Panasonic", "Canon", "Toshiba", "Mazda", "Fujifilm", "Subaru",
                                   "Hitachi", "Casio"],
    ("company_country", "Italy"): ["Ferrari", "Fiat", "Lamborghini", "Gucci", "Prada", "Maserati", "Ducati",
                                   "Armani", "Versace", "Pirelli", "Benetton", "Alfa Romeo", "Barilla"],
    ("company_country", "Germany"): ["BMW", "Volkswagen", "Siemens", "Mercedes-Benz", "Adidas", "Bosch", "Audi",
                                     "Porsche", "SAP", "Lufthansa", "Bayer"],
    ("company_country", "France"): ["Renault", "Peugeot", "Michelin", "Chanel", "Airbus", "Danone", "Citroën"],
    ("dish_country", "Italy"): ["Pizza", "Pasta", "Lasagna", "Risotto", "Tiramisu", "Gelato", "Spaghetti carbonara",
                                "Focaccia", "Ravioli", "Cannoli", "Bruschetta", "Minestrone", "Pesto",
                                "Panna cotta"],
    ("dish_country", "Japan"): ["Sushi", "Ramen", "Tempura", "Miso soup", "Sashimi", "Udon", "Teriyaki",
                                "Tonkatsu", "Onigiri", "Takoyaki", "Mochi"],
    ("dish_country", "India"): ["Naan", "Biryani", "Samosa", "Tandoori chicken", "Chicken tikka masala", "Dal",
                                "Paneer", "Masala dosa"],
    ("dish_country", "Mexico"): ["Tacos", "Burritos", "Enchiladas", "Guacamole", "Quesadillas", "Tamales"],
}

# for portability prompts: the country of each landmark city, the continent of each country
CITY_COUNTRY = {"Paris": "France", "Rome": "Italy", "London": "England", "New York": "the United States",
                "Moscow": "Russia", "Berlin": "Germany", "Athens": "Greece", "Barcelona": "Spain"}
COUNTRY_CONTINENT = {"Japan": "Asia", "France": "Europe", "Germany": "Europe", "Italy": "Europe", "Spain": "Europe",
                     "China": "Asia", "India": "Asia", "Russia": "Europe", "Canada": "North America",
                     "Australia": "Australia", "Brazil": "South America", "Turkey": "Asia", "Poland": "Europe",
                     "Egypt": "Africa", "Mexico": "North America"}


def fill(template: str, subject_as_written: str) -> str:
    text = template.replace("{}", subject_as_written, 1)
    return text[0].upper() + text[1:]


def bare(subject_as_written: str) -> str:
    return subject_as_written[4:] if subject_as_written.startswith("the ") else subject_as_written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--facts-per-group", type=int, default=8)
    ap.add_argument("--neighbors", type=int, default=6)
    ap.add_argument("--min-neighbors", type=int, default=5)
    ap.add_argument("--min-paraphrases", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("experiments/data/smollm2_facts.jsonl"))
    ap.add_argument("--record", type=Path, default=Path("experiments/results/editing/facts_build.json"))
    args = ap.parse_args()

    import workbench
    from workbench.surgery.metrics import score_pairs
    from workbench.surgery.requests import EditRequest, load_requests

    torch.set_num_threads(args.threads)
    model, tok = workbench.load(args.model, device="cpu", progress=False)
    model.eval()

    # every prompt to check: edit prompt, paraphrases, neighbourhood prompt of each (relation, subject)
    checks: dict[tuple[str, str], dict] = {}
    for (rel, answer), subjects in GROUPS.items():
        tpl, paras, neigh = RELATIONS[rel]
        for s in subjects:
            for kind, t in [("prompt", tpl), *(("paraphrase", p) for p in paras), ("neighborhood", neigh)]:
                checks.setdefault((fill(t, s), answer), {"relation": rel, "subject": bare(s), "kind": kind})
    pairs = list(checks)
    scores = score_pairs(model, tok, pairs, batch_size=64)
    for key, sc in zip(pairs, scores, strict=True):
        checks[key].update(passed=sc.exact, greedy=tok.decode(list(sc.argmax)), token_acc=sc.token_acc)

    def ok(template, s, answer):
        return checks[(fill(template, s), answer)]["passed"]

    answers_of = {}
    for rel, answer in GROUPS:
        answers_of.setdefault(rel, []).append(answer)
    # facts first (a subject is edited in one relation at most), then neighbours from the subjects never edited
    chosen_of, fact_subjects = {}, set()
    for (rel, answer), subjects in GROUPS.items():
        tpl, paras, neigh = RELATIONS[rel]
        free = [s for s in subjects if bare(s) not in fact_subjects]
        good = [s for s in free if ok(tpl, s, answer) and sum(ok(p, s, answer) for p in paras) >= args.min_paraphrases]
        n_neigh = sum(ok(neigh, s, answer) for s in free)  # fact subjects pass it too (same template)
        k = max(0, min(args.facts_per_group, len(good), n_neigh - args.min_neighbors))
        chosen_of[(rel, answer)] = good[:k]
        fact_subjects.update(bare(s) for s in good[:k])
    neighbors_of = {}
    for (rel, answer), subjects in GROUPS.items():
        neigh = RELATIONS[rel][2]
        neighbors_of[(rel, answer)] = [s for s in subjects if bare(s) not in fact_subjects
                                       and ok(neigh, s, answer)][:args.neighbors]
    facts, groups_report = [], []
    for (rel, answer), subjects in GROUPS.items():
        tpl, paras, neigh = RELATIONS[rel]
        others = [a for a in answers_of[rel] if a != answer]
        chosen, neighbors = chosen_of[(rel, answer)], neighbors_of[(rel, answer)]
        groups_report.append({"relation": rel, "answer": answer, "candidates": len(subjects),
                              "facts": [bare(s) for s in chosen], "neighbors": [bare(s) for s in neighbors],
                              "used": len(neighbors) >= args.min_neighbors and bool(others)})
        if len(neighbors) < args.min_neighbors or not others:
            continue
        for i, s in enumerate(chosen):
            new = others[(len(facts) + i) % len(others)]
            passing_paras = [fill(p, s) for p in paras if ok(p, s, answer)]
            port_p, port_a = [], []
            if rel == "landmark_city" and new in CITY_COUNTRY:
                port_p, port_a = [fill("{} is located in the country of", s)], [CITY_COUNTRY[new]]
            elif rel == "city_country" and new in COUNTRY_CONTINENT:
                port_p, port_a = [fill("{} is a city in the continent of", s)], [COUNTRY_CONTINENT[new]]
            facts.append({
                "case_id": len(facts), "prompt": fill(tpl, s), "subject": bare(s), "target_new": new,
                "ground_truth": answer, "rephrase_prompt": passing_paras,
                "locality_prompt": [fill(neigh, n) for n in neighbors],
                "locality_ground_truth": [answer] * len(neighbors),
                "portability_prompt": port_p, "portability_ground_truth": port_a,
            })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts), encoding="utf-8")
    reqs = load_requests(args.out)  # the file must read back through the editing API
    assert all(isinstance(r, EditRequest) and r.subject in r.text for r in reqs)
    n_checked = len(checks)
    n_passed = sum(c["passed"] for c in checks.values())
    by_rel = {}
    for f in facts:
        rel = checks[(f["prompt"], f["ground_truth"])]["relation"]
        by_rel[rel] = by_rel.get(rel, 0) + 1
    record = {"model": args.model, "n_facts": len(facts), "facts_by_relation": by_rel,
              "prompts_checked": n_checked, "prompts_passed": n_passed,
              "check": "greedy continuation starts with the answer's tokens (teacher-forced argmax of each token)",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "record")},
              "groups": groups_report,
              "checks": [{"prompt": p, "answer": a, **c} for (p, a), c in checks.items()]}
    write_json(args.record, {**provenance(), **{k: str(v) if isinstance(v, Path) else v for k, v in record.items()}})
    print(f"{n_passed}/{n_checked} candidate prompts answered correctly")
    for g in groups_report:
        print(f"{g['relation']:<18}{g['answer']:<20}{len(g['facts']):>3} facts {len(g['neighbors']):>3} neighbours")
    print(f"{len(facts)} facts {by_rel} -> {args.out}")


if __name__ == "__main__":
    main()
