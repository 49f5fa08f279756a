"""Builds the two MCTS task sets (offline, deterministic): arithmetic with exact answers and small Python
functions with unit tests.

    .venv/bin/python experiments/build_mcts_tasks.py   # writes experiments/data/mcts_{arithmetic,code}.jsonl

Each line holds the user message, the start of the assistant's reply the model continues from (``prefill``),
the text that ends an answer (``stop``) and what the reward needs (``answer``, or ``signature`` and ``tests``).
Arithmetic: 40 problems from a fixed seed, 14 additions and 13 subtractions of two-digit numbers (results
>= 0) and 13 products of a one-digit by a one- or two-digit number. The reply starts ``"a + b ="`` so the
answer is the next number. Code: the assistant's reply starts with a fenced block and the signature, so the
model writes the body; the tests are plain asserts.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

CODE = [
    ("add(a, b)", "returns the sum of a and b",
     ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]),
    ("is_even(n)", "returns True if the integer n is even and False otherwise",
     ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"]),
    ("maximum(xs)", "returns the largest number in the non-empty list xs",
     ["assert maximum([1, 5, 3]) == 5", "assert maximum([-2, -9]) == -2", "assert maximum([7]) == 7"]),
    ("reverse_string(s)", "returns the string s reversed",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''",
      "assert reverse_string('racecar') == 'racecar'"]),
    ("count_vowels(s)", "returns how many characters of the lowercase string s are vowels (a, e, i, o, u)",
     ["assert count_vowels('hello') == 2", "assert count_vowels('sky') == 0", "assert count_vowels('aeiou') == 5"]),
    ("factorial(n)", "returns n! for an integer n >= 0",
     ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(1) == 1"]),
    ("fibonacci(n)", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
     ["assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55"]),
    ("is_palindrome(s)", "returns True if the string s reads the same forwards and backwards",
     ["assert is_palindrome('level') is True", "assert is_palindrome('abc') is False",
      "assert is_palindrome('') is True"]),
    ("sum_list(xs)", "returns the sum of the numbers in the list xs (0 for an empty list)",
     ["assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0", "assert sum_list([-4, 4]) == 0"]),
    ("square_all(xs)", "returns a new list with the square of each number in xs",
     ["assert square_all([1, 2, 3]) == [1, 4, 9]", "assert square_all([]) == []", "assert square_all([-2]) == [4]"]),
    ("celsius_to_fahrenheit(c)", "converts a temperature c in degrees Celsius to degrees Fahrenheit",
     ["assert celsius_to_fahrenheit(0) == 32", "assert celsius_to_fahrenheit(100) == 212",
      "assert celsius_to_fahrenheit(-40) == -40"]),
    ("count_words(s)", "returns the number of words in the string s, where words are separated by whitespace",
     ["assert count_words('hello world') == 2", "assert count_words('') == 0", "assert count_words('one') == 1"]),
    ("filter_positive(xs)", "returns a list of the numbers in xs that are greater than zero, in order",
     ["assert filter_positive([1, -2, 3, 0]) == [1, 3]", "assert filter_positive([]) == []",
      "assert filter_positive([-1]) == []"]),
    ("last_element(xs)", "returns the last element of the non-empty list xs",
     ["assert last_element([1, 2, 3]) == 3", "assert last_element(['a']) == 'a'",
      "assert last_element([[1], [2]]) == [2]"]),
    ("is_prime(n)", "returns True if the integer n is a prime number and False otherwise",
     ["assert is_prime(2) is True", "assert is_prime(15) is False", "assert is_prime(13) is True",
      "assert is_prime(1) is False"]),
    ("gcd(a, b)", "returns the greatest common divisor of the positive integers a and b",
     ["assert gcd(12, 8) == 4", "assert gcd(7, 5) == 1", "assert gcd(10, 10) == 10"]),
    ("capitalize_words(s)", "returns s with the first letter of every space-separated word in upper case",
     ["assert capitalize_words('hello world') == 'Hello World'", "assert capitalize_words('a') == 'A'",
      "assert capitalize_words('') == ''"]),
    ("average(xs)", "returns the arithmetic mean of the numbers in the non-empty list xs",
     ["assert average([1, 2, 3]) == 2", "assert average([5]) == 5", "assert average([1, 2]) == 1.5"]),
    ("contains(xs, x)", "returns True if x is an element of the list xs and False otherwise",
     ["assert contains([1, 2], 2) is True", "assert contains([], 1) is False", "assert contains(['a'], 'b') is False"]),
    ("min_max(xs)", "returns a tuple (smallest, largest) of the numbers in the non-empty list xs",
     ["assert min_max([3, 1, 2]) == (1, 3)", "assert min_max([5]) == (5, 5)", "assert min_max([-1, -7]) == (-7, -1)"]),
    ("repeat_string(s, n)", "returns the string s repeated n times",
     ["assert repeat_string('ab', 3) == 'ababab'", "assert repeat_string('x', 0) == ''",
      "assert repeat_string('', 5) == ''"]),
    ("absolute_difference(a, b)", "returns the absolute value of the difference between a and b",
     ["assert absolute_difference(3, 7) == 4", "assert absolute_difference(7, 3) == 4",
      "assert absolute_difference(-2, 2) == 4"]),
    ("count_char(s, c)", "returns how many times the character c occurs in the string s",
     ["assert count_char('banana', 'a') == 3", "assert count_char('', 'a') == 0", "assert count_char('abc', 'z') == 0"]),
    ("second_largest(xs)", "returns the second largest distinct number in the list xs, which has at least two "
     "distinct numbers",
     ["assert second_largest([1, 3, 2]) == 2", "assert second_largest([5, 5, 4]) == 4",
      "assert second_largest([-1, -2]) == -2"]),
]


def arithmetic(seed: int) -> list[dict]:
    rng = random.Random(seed)
    ops = ["+"] * 14 + ["-"] * 13 + ["*"] * 13
    rng.shuffle(ops)
    rows, seen = [], set()
    for op in ops:
        while True:
            if op == "*":
                a, b = rng.randint(2, 9), rng.randint(3, 19)
            else:
                a, b = rng.randint(11, 99), rng.randint(11, 99)
                if op == "-" and b > a:
                    a, b = b, a
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                break
        expr = f"{a} {op} {b}"
        rows.append({"id": f"arith-{len(rows):02d}", "question": f"What is {expr}?", "prefill": f"{expr} =",
                     "stop": "\n", "answer": eval(expr)})  # noqa: S307 (a literal built above)
    return rows


def code() -> list[dict]:
    rows = []
    for sig, what, tests in CODE:
        name = sig.split("(")[0]
        rows.append({"id": f"code-{name}", "question": f"Write a Python function {sig} that {what}.",
                     "prefill": f"```python\ndef {sig}:", "stop": "```", "signature": f"def {sig}:",
                     "tests": tests})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args()
    for name, rows in (("arithmetic", arithmetic(args.seed)), ("code", code())):
        path = args.out / f"mcts_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} tasks")


if __name__ == "__main__":
    main()
