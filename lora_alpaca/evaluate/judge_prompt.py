"""The judge's prompt and how its answer is read.

The prompt follows AlpacaEval's protocol (two anonymous outputs, pick the better one,
answer with its label) in this project's own words. The order of the two answers is
randomised per pair (seeded by the instruction), so a judge that favours the first slot
does not favour either system.
"""

from __future__ import annotations

import hashlib
import math
import random
import re

LABELS = ("A", "B")

SYSTEM = (
    "You are a careful, impartial reviewer of answers written by AI assistants. "
    "You judge which answer serves the user better: correct, helpful, complete, clear "
    "and following the instruction. Length is not a merit in itself."
)

TEMPLATE = """Here is an instruction a user gave, and two answers to it.

## Instruction
{instruction}

## Answer (A)
{answer_a}

## Answer (B)
{answer_b}

Which answer is better, (A) or (B)? Reply with the single letter A or B and nothing else."""


def is_swapped(instruction: str, seed: int) -> bool:
    """True: the evaluated model's answer is shown as (A); False: as (B)."""
    digest = hashlib.sha256(f"{seed}\0{instruction}".encode()).hexdigest()
    return random.Random(digest).random() < 0.5


def judge_messages(instruction: str, answer_a: str, answer_b: str) -> list[dict]:
    user = TEMPLATE.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def label_of_token(token: str) -> str | None:
    t = token.strip().strip("()").strip()
    return t if t in LABELS else None


def preference_from_top_logprobs(top: list[tuple[str, float]]) -> float | None:
    """P(B) / (P(A) + P(B)) from the first answer token's alternatives; None if neither
    label is among them. Tokens " A", "(A", "A" all count for A (probabilities summed)."""
    mass = {"A": 0.0, "B": 0.0}
    for token, logprob in top:
        label = label_of_token(token)
        if label:
            mass[label] += math.exp(logprob)
    total = mass["A"] + mass["B"]
    return mass["B"] / total if total > 0 else None


_PATTERNS = (
    re.compile(r"\(\s*([AB])\s*\)"),  # "(B)"
    re.compile(r"^\W*([AB])\b"),  # "B", "B.", "**A**"
    re.compile(r"\b(?:answer|output)\s*([AB])\b", re.I),  # "Answer B is better"
)


def preference_from_text(text: str) -> float | None:
    """1.0 if the reply names B, 0.0 if A, None if it names neither (or both first)."""
    for pattern in _PATTERNS:
        found = {m.group(1) for m in pattern.finditer(text)}
        if len(found) == 1:
            return 1.0 if found.pop() == "B" else 0.0
        if found:
            return None  # names both: not a verdict
    return None
