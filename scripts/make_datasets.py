"""Generate the training and held-out data of the shipped trained tasks, reproducibly
(seeded, nothing downloaded).

    python scripts/make_datasets.py [--out data]

writes `<out>/<task>.train.jsonl` and `<out>/<task>.test.jsonl`, lines `{"input": ..., "output": ...}`.
Held-out sets use values (years, names, cities, nouns, adjectives) and some templates that the
training sets never contain, so a held-out score measures generalisation, not recall.

Tasks:
- `iso-date`: a date written in one of many surface formats -> `YYYY-MM-DD`.
- `extract-json`: a sentence naming a person and a city -> `{"name": "...", "city": "..."}`.
- `sentiment`: compositional review sentences (negation, intensifiers, "X but Y" contrast) ->
  `positive` | `negative`.
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

Example = dict[str, str]
SIZES = {"train": 600, "test": 150}

# ---------------------------------------------------------------------------------------------
# iso-date

MONTHS = list(calendar.month_name)[1:]
ABBR = list(calendar.month_abbr)[1:]


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


# Unambiguous surface formats only (month by name, or year first); (y, m, d) -> text.
DATE_FORMATS_TRAIN: list[Callable[[int, int, int], str]] = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{ABBR[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {ABBR[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {_ordinal(d)}, {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{y}/{m:02d}/{d:02d}",
    lambda y, m, d: f"{d}-{ABBR[m - 1]}-{y}",
    lambda y, m, d: f"{MONTHS[m - 1].upper()} {d} {y}",
]
# Held out only: formats never seen in training.
DATE_FORMATS_TEST_ONLY: list[Callable[[int, int, int], str]] = [
    lambda y, m, d: f"{ABBR[m - 1]}. {_ordinal(d)} {y}",
    lambda y, m, d: f"{y}.{m:02d}.{d:02d}",
]


def iso_date(rng: random.Random, split: str) -> Example:
    # Training years are odd, held-out years even: every held-out date is a date never seen.
    parity = 1 if split == "train" else 0
    y = rng.choice([v for v in range(1950, 2040) if v % 2 == parity])
    m = rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    formats = DATE_FORMATS_TRAIN + (DATE_FORMATS_TEST_ONLY if split == "test" else [])
    return {"input": rng.choice(formats)(y, m, d), "output": f"{y}-{m:02d}-{d:02d}"}


# ---------------------------------------------------------------------------------------------
# extract-json

FIRST = {
    "train": [
        "Anna",
        "John",
        "Maria",
        "Peter",
        "Laura",
        "David",
        "Sofia",
        "Omar",
        "Chen",
        "Fatima",
        "Lucas",
        "Emma",
        "Ivan",
        "Grace",
        "Carlos",
        "Hannah",
        "Yuki",
        "Ahmed",
        "Nina",
        "Paul",
    ],
    "test": [
        "Elena",
        "Marco",
        "Aisha",
        "Thomas",
        "Julia",
        "Kenji",
        "Rosa",
        "Samuel",
        "Ingrid",
        "Pablo",
        "Leila",
        "Victor",
    ],
}
LAST = {
    "train": [
        "Berg",
        "Smith",
        "Lopez",
        "Novak",
        "Fischer",
        "Brown",
        "Rossi",
        "Haddad",
        "Wang",
        "Khan",
        "Silva",
        "Dubois",
        "Petrov",
        "Kim",
        "Garcia",
        "Weber",
        "Sato",
        "Nasser",
        "Olsen",
        "Murphy",
    ],
    "test": [
        "Costa",
        "Lindqvist",
        "Moreau",
        "Tanaka",
        "Keller",
        "Okafor",
        "Romero",
        "Jensen",
        "Ahmadi",
        "Walsh",
    ],
}
CITIES = {
    "train": [
        "Oslo",
        "Madrid",
        "Chicago",
        "Berlin",
        "Lisbon",
        "Toronto",
        "Cairo",
        "Seoul",
        "Lima",
        "Dublin",
        "Vienna",
        "Nairobi",
        "Boston",
        "Lyon",
        "Osaka",
        "Denver",
        "Prague",
        "Mumbai",
        "Quito",
        "Perth",
    ],
    "test": [
        "Helsinki",
        "Naples",
        "Austin",
        "Kyoto",
        "Porto",
        "Warsaw",
        "Montreal",
        "Accra",
        "Bogota",
        "Glasgow",
    ],
}
PERSON_TEMPLATES_TRAIN = [
    "My name is {n} and I live in {c}.",
    "{n} lives in {c}.",
    "Hi, I'm {n} from {c}.",
    "{n} moved to {c} last year.",
    "Please send the package to {n} in {c}.",
    "Our new colleague {n} works from {c}.",
    "{c} is where {n} grew up.",
    "Contact: {n}, based in {c}.",
]
PERSON_TEMPLATES_TEST_ONLY = [
    "Yesterday {n} flew home to {c}.",
    "The winner, {n}, comes from {c}.",
]


def extract_json(rng: random.Random, split: str) -> Example:
    name = f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}"
    city = rng.choice(CITIES[split])
    templates = PERSON_TEMPLATES_TRAIN + (PERSON_TEMPLATES_TEST_ONLY if split == "test" else [])
    text = rng.choice(templates).format(n=name, c=city)
    return {"input": text, "output": json.dumps({"name": name, "city": city})}


# ---------------------------------------------------------------------------------------------
# sentiment

SUBJECTS = {
    "train": [
        "The food",
        "The service",
        "The hotel room",
        "The movie",
        "The battery",
        "The staff",
        "The screen",
        "The delivery",
        "The coffee",
        "The concert",
        "The app",
        "The seat",
    ],
    "test": ["The pizza", "The camera", "The soundtrack", "The checkout", "The keyboard", "The waiter"],
}
POSITIVE = {
    "train": ["great", "excellent", "wonderful", "delicious", "friendly", "fantastic", "pleasant", "superb"],
    "test": ["amazing", "lovely", "brilliant", "outstanding"],
}
NEGATIVE = {
    "train": ["terrible", "awful", "rude", "disappointing", "horrible", "boring", "broken", "slow"],
    "test": ["dreadful", "mediocre", "useless", "annoying"],
}
INTENSIFIERS = ["", "really ", "very ", "quite ", "extremely "]


def _clause(rng: random.Random, split: str, positive: bool) -> str:
    """A clause whose polarity is `positive`, possibly through negation of the opposite word."""
    subject = rng.choice(SUBJECTS[split])
    negate = rng.random() < 0.35
    word_positive = positive != negate
    adj = rng.choice(POSITIVE[split] if word_positive else NEGATIVE[split])
    if negate:
        return rng.choice(
            [f"{subject} was not {adj}", f"{subject} wasn't {adj} at all", f"{subject} was far from {adj}"]
        )
    return f"{subject} was {rng.choice(INTENSIFIERS)}{adj}"


def sentiment(rng: random.Random, split: str) -> Example:
    label = rng.random() < 0.5
    r = rng.random()
    if r < 0.45:
        text = _clause(rng, split, label) + "."
    elif r < 0.8:  # contrast: the clause after "but" decides
        text = f"{_clause(rng, split, not label)}, but {_lower(_clause(rng, split, label))}."
    else:  # concession: the main clause decides
        text = f"Although {_lower(_clause(rng, split, not label))}, {_lower(_clause(rng, split, label))}."
    return {"input": text, "output": "positive" if label else "negative"}


def _lower(clause: str) -> str:
    return clause[0].lower() + clause[1:]


# ---------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[[random.Random, str], Example]] = {
    "iso-date": iso_date,
    "extract-json": extract_json,
    "sentiment": sentiment,
}

# Each task's contract on its answers, the task.json of its store folders (`<task>` and `<task>-trained`):
# scripts/train_tasks.py and scripts/make_text_tasks.py write it, so a re-made folder keeps it. Greedy,
# and enough tokens for any answer above (a complete answer ends its request before that).
CONTRACTS: dict[str, dict[str, Any]] = {
    "iso-date": {
        "output": {
            "regex": "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
        },  # [0-9]: \d is any Unicode digit
        "defaults": {"temperature": 0, "max_new_tokens": 12},
    },
    "extract-json": {
        "output": {
            "json": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "city": {"type": "string", "minLength": 1},
                },
                "required": ["name", "city"],
                "additionalProperties": False,
            }
        },
        "defaults": {"temperature": 0, "max_new_tokens": 48},
    },
    "sentiment": {
        "output": {"choice": ["positive", "negative"]},
        "defaults": {"temperature": 0, "max_new_tokens": 8},
    },
}


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples; the seed depends on task and split, so each file is reproducible alone."""
    rng = random.Random(f"{seed}:{task}:{split}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = TASKS[task](rng, split)
        if ex["input"] not in seen:
            seen.add(ex["input"])
            out.append(ex)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for split, n in SIZES.items():
            path = args.out / f"{task}.{split}.jsonl"
            rows = generate(task, split, n, args.seed)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
