"""Validate raw rows: every problem in every row is collected and reported in one error
line (with row numbers), then the empty-output and duplicate policies are applied.

Duplicates are exact (instruction, input, output) matches after loading; the first copy
is kept, so removing them before the train/validation split also keeps any copy of a
validation row out of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_alpaca.data.options import DataOptions
from lora_alpaca.data.sources import SourceFile
from lora_alpaca.errors import UsageError

MAX_PROBLEMS_SHOWN = 10
DEFAULT_INPUT_COLUMN = "input"


class Problems:
    """Every bad row, reported together in one line (capped, with counts by kind)."""

    def __init__(self, source: str):
        self.source, self.items, self.kinds, self.hints = source, [], {}, []

    def add(self, position: str, kind: str, message: str, hint: str = "") -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if len(self.items) < MAX_PROBLEMS_SHOWN:
            self.items.append(f"{position}: {message}")
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def raise_if_any(self) -> None:
        n = sum(self.kinds.values())
        if not n:
            return
        msg = f"{self.source}: {n} problem{'s' if n > 1 else ''}: " + "; ".join(self.items)
        if n > len(self.items):
            kinds = ", ".join(
                f"{c} {k}" for k, c in sorted(self.kinds.items(), key=lambda kv: -kv[1])
            )
            msg += f"; ... and {n - len(self.items)} more (in all: {kinds})"
        if self.hints:
            msg += "; hint: " + "; ".join(self.hints)
        raise UsageError(msg)


class RowPolicy:
    """The --empty_outputs and --duplicates policies, one mechanism for Alpaca rows and
    conversations: a row they catch is counted in `skipped` (skip) or reported (error)."""

    def __init__(self, opts: DataOptions, problems: Problems, skipped: dict[str, int]):
        self.opts, self.problems, self.skipped = opts, problems, skipped
        self.first_seen: dict[Any, str] = {}

    def empty_output(self, position: str, message: str, hint: str) -> None:
        """A row with an empty output: always dropped, counted or reported by policy."""
        if self.opts.empty_outputs == "skip":
            self.skipped["empty output"] += 1
        else:
            self.problems.add(position, "empty output", message, hint)

    def is_duplicate(self, key: Any, position: str) -> bool:
        """True (row dropped, counted or reported) when `key` was seen in an earlier row."""
        if key not in self.first_seen:
            self.first_seen[key] = position
            return False
        if self.opts.duplicates == "skip":
            self.skipped["duplicate"] += 1
        else:
            self.problems.add(
                position,
                "duplicate",
                f"exact duplicate of {self.first_seen[key]}",
                "--duplicates skip keeps the first copy of each duplicate",
            )
        return True


@dataclass
class Rows:
    """Valid rows in source order: text fields, global index, and printable position."""

    instructions: list[str]
    inputs: list[str]
    outputs: list[str]
    index: list[int]
    positions: list[str]
    rows_read: int
    skipped: dict[str, int]


def _columns(sources: list[SourceFile]) -> list[str]:
    seen: dict[str, None] = {}
    for s in sources:
        for c in s.columns or []:
            seen[c] = None
        if s.columns is None:
            for r in s.records:
                if isinstance(r, dict):
                    seen.update(dict.fromkeys(r))
    return list(seen)


def _check_text(value: Any, column: str) -> str | None:
    """Why a field value is unusable as training text, or None if it is fine."""
    if value is None:
        return f"{column!r} is null, expected a string"
    if not isinstance(value, str):
        return f"{column!r} is {type(value).__name__}, expected a string"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{column!r} contains an unpaired UTF-16 surrogate (invalid Unicode text)"
    return None


def validate(sources: list[SourceFile], opts: DataOptions, source_name: str) -> Rows:
    """Check every row; raise one UsageError listing all problems; apply skip policies."""
    ic, xc, oc = opts.instruction_column, opts.input_column, opts.output_column
    columns = _columns(sources)
    rows_read = sum(len(s.records) for s in sources)
    if rows_read == 0:
        raise UsageError(
            f"{source_name}: no rows (expected Alpaca rows with instruction, input, output)"
        )
    for flag, col in (("--instruction_column", ic), ("--output_column", oc)):
        if col not in columns:
            raise UsageError(
                f"{flag} {col!r}: no such column in {source_name}; columns present: "
                f"{', '.join(map(str, columns[:20])) or '(none)'}"
            )
    if xc not in columns and xc != DEFAULT_INPUT_COLUMN:
        raise UsageError(
            f"--input_column {xc!r}: no such column in {source_name}; columns present: "
            f"{', '.join(map(str, columns[:20]))}"
        )
    problems = Problems(source_name)
    prefix = len(sources) > 1
    out = Rows([], [], [], [], [], rows_read, {"empty output": 0, "duplicate": 0})
    policy = RowPolicy(opts, problems, out.skipped)
    g = -1
    for s in sources:
        for i, rec in enumerate(s.records):
            g += 1
            pos = f"{s.name} {s.position(i)}" if prefix else s.position(i)
            if not isinstance(rec, dict):
                problems.add(
                    pos,
                    "not an object",
                    f"expected an object with {ic!r} and {oc!r}, got {type(rec).__name__}",
                )
                continue
            bad = False
            for col in (ic, oc):
                if col not in rec:
                    problems.add(pos, f"missing {col!r}", f"missing key {col!r}")
                    bad = True
                elif why := _check_text(rec[col], col):
                    problems.add(pos, "not a string", why)
                    bad = True
            inp = rec.get(xc)
            if inp is None:
                inp = ""  # null input is the common spelling of "no input" in exported data
            elif why := _check_text(inp, xc):
                problems.add(pos, "not a string", why)
                bad = True
            if bad:
                continue
            instruction, output = rec[ic], rec[oc]
            if not instruction.strip():
                problems.add(pos, "empty instruction", "empty instruction")
                continue
            if not output.strip():
                policy.empty_output(
                    pos, "empty output", "--empty_outputs skip drops rows with an empty output"
                )
                continue
            if policy.is_duplicate((instruction, inp, output), pos):
                continue
            out.instructions.append(instruction)
            out.inputs.append(inp)
            out.outputs.append(output)
            out.index.append(g)
            out.positions.append(pos)
    problems.raise_if_any()
    if not out.instructions:
        why = ", ".join(f"{n} {k}" for k, n in out.skipped.items() if n)
        raise UsageError(
            f"{source_name}: no rows left to train on (all {rows_read} skipped: {why})"
        )
    return out
