"""The Quickstart dataset shipped in data/: valid Alpaca rows, right answers, our own text."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN = DATA / "quickstart.json"
EVAL = DATA / "quickstart_eval.json"
MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
LABELS = {"positive", "negative"}


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_generator():
    spec = importlib.util.spec_from_file_location("make_quickstart", DATA / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return load_rows(TRAIN)


@pytest.fixture(scope="module")
def held_out() -> list[dict]:
    return load_rows(EVAL)


@pytest.mark.parametrize("path", [TRAIN, EVAL], ids=["train", "eval"])
def test_rows_are_alpaca_format(path):
    rows = load_rows(path)
    assert isinstance(rows, list)
    for i, row in enumerate(rows):
        assert isinstance(row, dict) and set(row) == {"instruction", "input", "output"}, i
        assert all(isinstance(v, str) for v in row.values()), i
        assert row["instruction"].strip() and row["output"].strip(), i
        assert row["instruction"] == row["instruction"].strip(), i


def test_row_counts_and_both_templates(train, held_out):
    assert 200 <= len(train) <= 400
    assert 20 <= len(held_out) <= 100
    for rows in (train, held_out):
        with_input = sum(1 for r in rows if r["input"])
        # Both Alpaca prompts (with and without `### Input:`) must be exercised, each
        # often enough to be learned, not just present once.
        assert 0.2 * len(rows) <= with_input <= 0.8 * len(rows)


def test_no_duplicates_and_eval_disjoint_from_train(train, held_out):
    train_keys = [(r["instruction"], r["input"]) for r in train]
    eval_keys = [(r["instruction"], r["input"]) for r in held_out]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    assert not set(train_keys) & set(eval_keys)


def test_files_are_what_the_generator_writes():
    """The shipped files are reproducible from the script and its seed, byte for byte."""
    gen = load_generator()
    train_rows, eval_rows = gen.generate()
    assert gen.dump(train_rows) == TRAIN.read_text(encoding="utf-8")
    assert gen.dump(eval_rows) == EVAL.read_text(encoding="utf-8")
    assert TRAIN.read_text(encoding="utf-8").startswith('[\n  {\n    "instruction"')


def parse_written_date(text: str) -> dt.date:
    """Read a date the way a person would, independently of how the generator wrote it."""
    month = next(i + 1 for i, m in enumerate(MONTHS) if re.search(rf"\b{m[:3]}", text))
    year = int(re.search(r"\b(19|20)\d\d\b", text).group())
    day = int(re.search(r"\b(\d{1,2})(st|nd|rd|th)?\b(?!\d)", text).group(1))
    return dt.date(year, month, day)


def test_every_answer_is_right(train, held_out):
    tasks = {"sentiment": 0, "date": 0, "person": 0}
    for row in train + held_out:
        source, out = row["instruction"] + " " + row["input"], row["output"]
        if out in LABELS:
            tasks["sentiment"] += 1
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", out):
            tasks["date"] += 1
            assert dt.date.fromisoformat(out) == parse_written_date(source), row
        else:
            tasks["person"] += 1
            fields = json.loads(out)
            assert list(fields) == ["name", "job", "city"], row
            assert all(re.search(rf"\b{v}\b", source) for v in fields.values()), row
    # Three tasks, balanced: none is a token few rows.
    assert min(tasks.values()) >= 0.25 * sum(tasks.values()), tasks


def test_sentiment_labels_follow_the_review_wording(train):
    gen = load_generator()
    good = {v for vs in gen.GOOD.values() for v in vs}
    bad = {v for vs in gen.BAD.values() for v in vs}
    assert not good & bad
    for row in train:
        if row["output"] in LABELS:
            text = row["instruction"] + " " + row["input"]
            hits_good = any(v in text for v in good)
            hits_bad = any(v in text for v in bad)
            assert hits_good != hits_bad, row
            assert row["output"] == ("positive" if hits_good else "negative"), row


def test_rows_fit_the_quickstart_cutoff(train, held_out, smollm2):
    """No row is truncated at `--cutoff_len 256`, so no answer loses its EOS in training."""
    from transformers import AutoTokenizer

    from lora_alpaca.prompts import load_template

    tok = AutoTokenizer.from_pretrained(smollm2)
    template = load_template("alpaca")
    texts = [
        template.build_prompt(r["instruction"], r["input"]) + r["output"] for r in train + held_out
    ]
    lengths = [len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert max(lengths) <= 256
    # Short rows are what makes the Quickstart fit in minutes on a laptop CPU.
    assert sum(lengths) / len(lengths) <= 120


def test_no_row_is_copied_from_alpaca(train, held_out, alpaca_json):
    """The Quickstart data is our own writing, not the CC BY-NC Alpaca release."""
    alpaca = load_rows(alpaca_json)
    norm = " ".join
    alpaca_pairs = {(norm(r["instruction"].split()), norm(r["output"].split())) for r in alpaca}
    alpaca_instructions = {norm(r["instruction"].split()) for r in alpaca}
    for row in train + held_out:
        pair = (norm(row["instruction"].split()), norm(row["output"].split()))
        assert pair not in alpaca_pairs, row
        # Instruction + input together are the text of a row; none may be Alpaca's.
        assert norm((row["instruction"] + " " + row["input"]).split()) not in alpaca_instructions, (
            row
        )
