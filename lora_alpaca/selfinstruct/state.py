"""The run's state, written atomically to the output folder after every round.

state.json is the truth: the kept tasks with their similarity figures, the RNG state, the
counts and token usage. regen.json and alpaca_data.json are derived from it (rewritten
from it on resume), so a kill between two writes never leaves them disagreeing for long.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import write_json_atomic

STATE_NAME = "state.json"
REGEN_NAME = "regen.json"
ALPACA_NAME = "alpaca_data.json"
STATE_FORMAT = "lora-alpaca-selfinstruct-state/1"
SAMPLES_PER_REASON = 5  # rejected examples kept for the report


def new_state(recipe: dict, seeds_sha256: str, rng: random.Random) -> dict:
    return {
        "format": STATE_FORMAT,
        "recipe": recipe,
        "seed_tasks_sha256": seeds_sha256,
        "rng_state": rng_state_to_json(rng),
        "rounds": 0,
        "requests": 0,
        "candidates": 0,
        "rejected": {},
        "rejected_samples": {},
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "kept": [],
    }


def rng_state_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_json(data: list) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng


def load_state(out_dir: Path) -> dict:
    path = out_dir / STATE_NAME
    if not path.is_file():
        raise UsageError(
            f"--resume: {out_dir} has no {STATE_NAME} (not a generate_instruction.py folder, or it never finished a round)"
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--resume: {path} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"--resume: {path} is not a {STATE_FORMAT} file")
    return state


def check_resumable(state: dict, recipe: dict, seeds_sha256: str, out_dir: Path) -> None:
    """A resumed run must continue the same recipe, or its data would silently mix two."""
    diffs = [
        f"--{k} {recipe[k]!r} (the folder has {state['recipe'].get(k)!r})"
        for k in recipe
        if state["recipe"].get(k) != recipe[k]
    ]
    if state["seed_tasks_sha256"] != seeds_sha256:
        diffs.append("--seed_tasks (other seed tasks than the folder's run)")
    if diffs:
        raise UsageError(
            f"--resume {out_dir}: differs from the run that started it: " + "; ".join(diffs)
        )


def write_outputs(out_dir: Path, state: dict, limit: int) -> None:
    """regen.json (Stanford's records) and the Alpaca file: the first `limit` kept tasks."""
    kept = state["kept"][:limit]
    write_json_atomic(out_dir / REGEN_NAME, kept)
    alpaca = [{k: t[k] for k in ("instruction", "input", "output")} for t in kept]
    write_json_atomic(out_dir / ALPACA_NAME, alpaca)


def save_round(out_dir: Path, state: dict, limit: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(out_dir, state, limit)
    write_json_atomic(out_dir / STATE_NAME, state)  # last: it marks the round as done
