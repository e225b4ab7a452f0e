"""Evaluation sets and AlpacaEval files.

An evaluation set is read into rows `{instruction, input, dataset}` from any of:
- the self-instruct user-oriented prompts (`instruction`, `instances: [{input}]`, JSONL),
- AlpacaEval files (`[{instruction, output?, generator?, dataset?}]`),
- Alpaca rows (`instruction`, `input`, `output`), or plain JSONL of `instruction` rows.

AlpacaEval keys pairs by the instruction text, which holds the whole prompt; rows with an
input are therefore written as `instruction + "\n\n" + input` (`alpaca_eval_instruction`).
"""

from __future__ import annotations

from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import read_json_rows


def alpaca_eval_instruction(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _text(row: dict, key: str, where: str, required: bool) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        need = "a non-empty string" if required else "a string"
        raise UsageError(f"{where}: {key!r} must be {need}")
    return value


def read_eval_set(path: str, flag: str = "--eval_set", limit: int = 0) -> list[dict]:
    """Rows `{instruction, input, dataset, reference}` of any supported set (reference: its
    answer, "" when it has none); one-line errors."""
    rows = []
    default_dataset = Path(path).stem
    for where, row in read_json_rows(path, flag):
        where = f"{flag} {path} {where}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        instruction = _text(row, "instruction", where, required=True)
        input_text = _text(row, "input", where, required=False)
        instances = row.get("instances")
        if not input_text and isinstance(instances, list) and instances:
            if not isinstance(instances[0], dict):
                raise UsageError(f"{where}: 'instances' must hold objects with 'input'")
            input_text = _text(instances[0], "input", where + " instances[0]", required=False)
        dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else default_dataset
        # A reference answer, when the set has one: scored as held-out loss by `answers`.
        reference = row.get("output")
        if reference is None and isinstance(instances, list) and instances:
            reference = instances[0].get("output")
        reference = reference if isinstance(reference, str) and reference.strip() else ""
        rows.append(
            {"instruction": instruction, "input": input_text, "dataset": dataset,
             "reference": reference}
        )  # fmt: skip
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    return rows[:limit] if limit > 0 else rows


def read_model_outputs(path: str, flag: str) -> list[dict]:
    """An AlpacaEval outputs file (every row needs `instruction` and `output` strings), or
    the JSONL answers of `generate.py --input_file` (`response`); generator: the file name."""
    rows = []
    for where, row in read_json_rows(path, flag):
        where = f"{flag} {path} {where}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        _text(row, "instruction", where, required=True)
        if "output" not in row and isinstance(row.get("response"), str):
            # A `generate.py --input_file` answers file: same engine, its own field names.
            instruction = alpaca_eval_instruction(row["instruction"], row.get("input") or "")
            row = {**row, "instruction": instruction, "output": row["response"]}
        _text(row, "output", where, required=False)
        if "output" not in row:
            raise UsageError(f"{where}: needs an 'output' string (AlpacaEval format)")
        rows.append({**row, "generator": str(row.get("generator") or Path(path).stem)})
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    return rows


def pair_outputs(model_rows: list[dict], reference_rows: list[dict]) -> list[dict]:
    """Pairs keyed by instruction text, in the model file's order (AlpacaEval's rule).

    Every model instruction needs a reference answer; duplicate instructions pair in order."""
    by_instruction: dict[str, list[dict]] = {}
    for r in reference_rows:
        by_instruction.setdefault(r["instruction"], []).append(r)
    pairs = []
    for i, m in enumerate(model_rows):
        refs = by_instruction.get(m["instruction"])
        if not refs:
            raise UsageError(
                f"--reference_outputs: no answer for --model_outputs row {i} "
                f"(instruction {m['instruction'][:60]!r}); both files need the same instructions"
            )
        r = refs.pop(0)
        pairs.append(
            {
                "index": i,
                "instruction": m["instruction"],
                "dataset": m.get("dataset", ""),
                "model_output": m["output"],
                "reference_output": r["output"],
                "model_row": m,
                "reference_row": r,
            }
        )
    names = {model_rows[0]["generator"], reference_rows[0]["generator"]}
    if len(names) == 1:
        raise UsageError(
            f"--model_outputs and --reference_outputs: both generators are called "
            f"{model_rows[0]['generator']!r}; give them different 'generator' names"
        )
    return pairs


def check_output_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--output_dir {path}: is a file; give a folder")
    if not p.parent.resolve().is_dir():
        raise UsageError(f"--output_dir {path}: folder {str(p.parent)!r} does not exist")
    return p
