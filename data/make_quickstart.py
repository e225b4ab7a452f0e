"""Generate the Quickstart dataset: data/quickstart.json (train) and data/quickstart_eval.json.

Every row is written by this script from word lists typed in below (no text is taken
from any other dataset), so the files can be rebuilt byte for byte:

    python data/make_quickstart.py            # writes both files next to this script
    python data/make_quickstart.py --check    # exits 1 if the files on disk differ

The tasks are small, deterministic text transformations whose right answer a short
LoRA run on SmolLM2-135M can learn, and which the base model answers in prose or in
the wrong format: the point is a change a person can see in one sample.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20261126
N_TRAIN = 300
N_EVAL = 40
N_REBALANCE = 25  # see rebalance()
HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "quickstart.json"
EVAL_FILE = HERE / "quickstart_eval.json"

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
NAMES = [
    "Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Lucas", "Priya", "Mateo",
    "Hannah", "Yusuf", "Elena", "Noah", "Chloe", "Ivan", "Zara", "Daniel", "Mei", "Pablo",
    "Grace", "Arjun", "Nora", "Felix", "Amara", "Leo", "Ingrid", "Samir", "Julia", "Kofi",
]  # fmt: skip
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Toronto", "Madrid", "Seoul", "Lima", "Dublin", "Cairo",
    "Berlin", "Sydney", "Mumbai", "Denver", "Prague", "Hanoi", "Quito", "Vienna", "Accra",
    "Porto", "Kyoto", "Boston", "Warsaw", "Manila", "Zurich", "Austin", "Tunis",
]  # fmt: skip
JOBS = [
    "nurse", "teacher", "baker", "pilot", "chemist", "carpenter", "lawyer", "painter",
    "farmer", "librarian", "dentist", "plumber", "journalist", "architect", "chef",
    "mechanic", "gardener", "pharmacist", "photographer", "translator",
]  # fmt: skip
# Things you buy, and things you experience: each gets verbs that fit it, so every
# review reads as something a person could write.
OBJECTS = [
    "coffee maker", "phone case", "laptop", "backpack", "toaster", "desk chair",
    "blender", "jacket", "bike lock", "tent", "keyboard", "umbrella", "kettle", "lamp",
]  # fmt: skip
EXPERIENCES = [
    "hotel room", "pizza", "movie", "restaurant", "train ride", "haircut", "museum tour",
    "concert", "yoga class", "guided hike", "video game", "cooking course",
]  # fmt: skip
GOOD = {
    "any": ["is excellent", "exceeded my expectations", "is worth every penny", "is wonderful",
            "made me very happy", "is superb"],
    "object": ["works perfectly", "arrived early and works great", "is the best I have owned"],
    "experience": ["was a real pleasure", "made my week", "was fantastic"],
}  # fmt: skip
BAD = {
    "any": ["was a waste of money", "is awful", "was a huge disappointment", "is terrible",
            "made me angry", "is useless"],
    "object": ["broke after two days", "stopped working quickly", "arrived damaged"],
    "experience": ["was boring and too long", "was overpriced", "ruined my evening"],
}  # fmt: skip
REVIEW_FORMS = {
    "any": ["The {p} {v}.", "Honestly, the {p} {v}.", "This {p} {v}, in my opinion.",
            "My friend recommended the {p}; it {v}."],
    "object": ["I bought the {p} last month and it {v}."],
    "experience": [],
}  # fmt: skip
DATE_SENTENCES = [
    "The meeting was moved to {d}.",
    "She was born on {d}.",
    "Our lease ends on {d}.",
    "The concert takes place on {d}.",
    "Please submit the report by {d}.",
    "The shop reopened on {d}.",
    "He started his new job on {d}.",
    "The package should arrive on {d}.",
]  # fmt: skip
PERSON_SENTENCES = [
    "{n} is a {j} who lives in {c}.",
    "{n} works as a {j} in {c}.",
    "Last year {n} moved to {c} to work as a {j}.",
    "In {c}, {n} has been a {j} for ten years.",
    "{n}, a {j}, was born and raised in {c}.",
    "My neighbour {n} is a {j} from {c}.",
]  # fmt: skip


def ordinal(day: int) -> str:
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def spoken_date(rng: random.Random, year: int, month: int, day: int) -> str:
    """One of several ways people write a date; the answer is always YYYY-MM-DD."""
    name = MONTHS[month - 1]
    forms = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {ordinal(day)} of {name} {year}",
        f"{name[:3]} {day}, {year}",
        f"{name} {ordinal(day)}, {year}",
    ]
    return rng.choice(forms)


def sentiment_row(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    kind = rng.choice(["object", "experience"])
    product = rng.choice(OBJECTS if kind == "object" else EXPERIENCES)
    verbs = GOOD if label == "positive" else BAD
    verb = rng.choice(verbs["any"] + verbs[kind])
    review = rng.choice(REVIEW_FORMS["any"] + REVIEW_FORMS[kind]).format(p=product, v=verb)
    if rng.random() < 0.3:
        instruction = f'Is this review positive or negative? "{review}"'
        return {"instruction": instruction, "input": "", "output": label}
    instruction = rng.choice(
        [
            "Classify the sentiment of this review as positive or negative.",
            "Is the following review positive or negative?",
            "Label the sentiment of the review.",
        ]
    )
    return {"instruction": instruction, "input": review, "output": label}


def date_row(rng: random.Random) -> dict:
    year, month = rng.randint(1990, 2030), rng.randint(1, 12)
    day = rng.randint(1, 28)
    answer = f"{year:04d}-{month:02d}-{day:02d}"
    written = spoken_date(rng, year, month, day)
    if rng.random() < 0.4:
        instruction = f"Write {written} as an ISO 8601 date (YYYY-MM-DD)."
        return {"instruction": instruction, "input": "", "output": answer}
    sentence = rng.choice(DATE_SENTENCES).format(d=written)
    instruction = rng.choice(
        [
            "Extract the date from the sentence in YYYY-MM-DD format.",
            "What date is mentioned? Answer as YYYY-MM-DD.",
            "Convert the date in this text to ISO 8601 format.",
        ]
    )
    return {"instruction": instruction, "input": sentence, "output": answer}


def person_row(rng: random.Random) -> dict:
    name, city, job = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS)
    sentence = rng.choice(PERSON_SENTENCES).format(n=name, c=city, j=job)
    answer = json.dumps({"name": name, "job": job, "city": city})
    if rng.random() < 0.3:
        instruction = f"Extract the name, job and city as JSON: {sentence}"
        return {"instruction": instruction, "input": "", "output": answer}
    instruction = rng.choice(
        [
            "Extract the person's name, job and city as a JSON object.",
            "Return the name, job and city mentioned in the text as JSON.",
        ]
    )
    return {"instruction": instruction, "input": sentence, "output": answer}


TASKS = {"sentiment": sentiment_row, "date": date_row, "person": person_row}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Train and eval rows; no (instruction, input) pair appears twice in either or both."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []
    names = list(TASKS)
    while len(rows) < N_TRAIN + N_EVAL:
        row = TASKS[names[len(rows) % len(names)]](rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    # Round-robin above keeps the tasks balanced; the eval rows are the last N_EVAL
    # (also balanced), the train rows are shuffled so batches mix the tasks.
    train, held_out = rows[:N_TRAIN], rows[N_TRAIN:]
    rng.shuffle(train)
    return rebalance(train, seen), held_out


def task_of(row: dict) -> str:
    if row["output"].startswith("{"):
        return "person"
    return "sentiment" if row["output"] in ("positive", "negative") else "date"


def rebalance(train: list[dict], seen: set[tuple[str, str]]) -> list[dict]:
    """Trade N_REBALANCE sentiment and date rows for twice as many JSON rows (same size,
    same number of steps; the held-out rows are unchanged).

    Why: inside a JSON string a word is tokenized without its leading space ("Noah" is
    `No` + `ah` after ` "`), while the prompt's sentence has it as one word token
    (` Noah`). The model must learn to re-spell every name and job it copies; with ~3
    examples per name it copied the prompt's token instead (`{"name": " Noah"}`). The two
    other tasks were already learned (sentiment 14/14) and have no such mismatch."""
    rng = random.Random(SEED + 1)
    drop = {"sentiment": N_REBALANCE, "date": N_REBALANCE}
    kept = []
    for row in train:
        task = task_of(row)
        if drop.get(task):
            drop[task] -= 1
            continue
        kept.append(row)
    while len(kept) < len(train):
        row = person_row(rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    rng.shuffle(kept)
    return kept


def dump(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    train, held_out = generate()
    outputs = {TRAIN_FILE: dump(train), EVAL_FILE: dump(held_out)}
    if "--check" in argv:
        stale = [
            p.name for p, text in outputs.items() if not p.is_file() or p.read_text("utf-8") != text
        ]
        print("up to date" if not stale else f"out of date: {', '.join(stale)}")
        return 1 if stale else 0
    for path, text in outputs.items():
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a file
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
