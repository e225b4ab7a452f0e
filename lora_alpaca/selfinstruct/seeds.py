"""Seed tasks: self-instruct's `seed_tasks.jsonl` rows (`instruction`, `instances: [{input,
output}]`) or plain Alpaca rows (`instruction`, `input`, `output`), as JSONL or a JSON array.

The default set (`seed_tasks.jsonl` beside this module, so it travels inside the package
and a wheel) is 40 everyday tasks written for this project.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import read_json_rows

DEFAULT_SEED_TASKS = Path(__file__).resolve().parent / "seed_tasks.jsonl"


def _task(row: object, where: str, flag: str) -> dict:
    if not isinstance(row, dict):
        raise UsageError(f"{flag} {where}: expected a JSON object, got {type(row).__name__}")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UsageError(f"{flag} {where}: needs a non-empty string 'instruction'")
    if "instances" in row:  # self-instruct format: the first instance, as Stanford used
        inst = row["instances"]
        if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
            raise UsageError(f"{flag} {where}: 'instances' must be a non-empty list of objects")
        task_input, output = inst[0].get("input", ""), inst[0].get("output")
    else:
        task_input, output = row.get("input", ""), row.get("output")
    if task_input is None:
        task_input = ""
    if not isinstance(task_input, str):
        raise UsageError(f"{flag} {where}: 'input' must be a string")
    if not isinstance(output, str) or not output.strip():
        raise UsageError(f"{flag} {where}: needs a non-empty string 'output'")
    return {"instruction": instruction.strip(), "input": task_input, "output": output}


def load_seed_tasks(path: str | None, need: int, flag: str = "--seed_tasks") -> list[dict]:
    """Seed tasks as {instruction, input, output}; one-line errors naming the file and row."""
    p = Path(path) if path else DEFAULT_SEED_TASKS
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file")
    rows = [row for _, row in read_json_rows(str(p), flag)]
    tasks = [_task(r, f"{p} row {i}", flag) for i, r in enumerate(rows, start=1)]
    if len(tasks) < need:
        raise UsageError(
            f"{flag} {p}: {len(tasks)} task(s); --num_prompt_instructions {need} needs at least {need}"
        )
    return tasks


def tasks_fingerprint(tasks: list[dict]) -> str:
    """sha256 of the seed tasks' content (a resumed run must sample from the same seeds)."""
    blob = json.dumps(tasks, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()
