"""The data audit: what training will actually see, computed from the tokenized rows and
printed before training (or alone with `finetune.py --audit_only`).

It answers the questions that decide whether a run is worth starting: how many rows were
kept and why others were skipped, how long examples are in tokens (and which
`--cutoff_len` would fit nearly all of them), how many get cut, what share of tokens is
learned, whether any row teaches nothing, and what a training example really looks like.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np

from lora_alpaca.constants import IGNORE_INDEX

PERCENTILES = (50, 90, 99)
CUTOFF_COVERAGE = 99  # recommended --cutoff_len: rows up to this percentile fit uncut
CUTOFF_STEP = 32  # ... rounded up to a multiple of this (tensor-core friendly, easy to type)
MAX_ZERO_LISTED = 10


@dataclass
class Audit:
    source: str
    template: str
    cutoff_len: int
    train_on_inputs: bool
    add_eos_token: bool
    overlength: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    train_rows: int = 0
    val_rows: int = 0
    seed: int = 42
    length_percentiles: dict[str, int] = field(default_factory=dict)  # before cutting
    recommended_cutoff_len: int = 0
    truncated_rows: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    zero_supervised_rows: int = 0
    zero_supervised_positions: list[str] = field(default_factory=list)
    examples: list[dict] = field(
        default_factory=list
    )  # {"position", "segments": [[text, learned]]}
    context_len: int = 0  # the model's context, set by finetune.py; caps the recommendation
    notes: list[str] = field(default_factory=list)  # warnings worth repeating on every run
    conversation: dict = field(default_factory=dict)  # conversation data only (conversations.py)

    @property
    def truncated_share(self) -> float:
        return self.truncated_rows / self.rows_kept if self.rows_kept else 0.0

    @property
    def advised_cutoff_len(self) -> int:
        """The --cutoff_len to advise: the recommendation, capped at the model's context."""
        if self.context_len and self.recommended_cutoff_len > self.context_len:
            return self.context_len
        return self.recommended_cutoff_len

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Audit:
        return cls(**data)


def recommend_cutoff_len(full_lengths: np.ndarray) -> int:
    if len(full_lengths) == 0:
        return 0
    p = float(np.percentile(full_lengths, CUTOFF_COVERAGE, method="higher"))
    return int(-(-p // CUTOFF_STEP) * CUTOFF_STEP)


def measure(
    audit: Audit,
    full_lengths: np.ndarray,
    lengths: np.ndarray,
    supervised: np.ndarray,
    truncated: np.ndarray,
    positions: list[str],
) -> None:
    """Fill the token statistics from per-row arrays (rows as kept, before the split).

    full_lengths: tokens a row would have uncut; lengths: tokens after cutting;
    supervised: learned tokens per row; truncated: bool per row; positions: row names.
    """
    if len(full_lengths):
        # method="higher": report a length some row really has, not an interpolation.
        values = np.percentile(full_lengths, PERCENTILES, method="higher")
        audit.length_percentiles = {
            f"p{q}": int(v) for q, v in zip(PERCENTILES, values, strict=True)
        }
        audit.length_percentiles["max"] = int(full_lengths.max())
    audit.recommended_cutoff_len = recommend_cutoff_len(full_lengths)
    audit.truncated_rows = int(truncated.sum())
    audit.total_tokens = int(lengths.sum())
    audit.supervised_tokens = int(supervised.sum())
    zero = np.flatnonzero(supervised == 0)
    audit.zero_supervised_rows = int(len(zero))
    audit.zero_supervised_positions = [positions[i] for i in zero[:MAX_ZERO_LISTED]]


def learned_segments(input_ids: list[int], labels: list[int], tokenizer) -> list[list]:
    """Split an example into runs of [decoded text, learned?] for display."""
    segments: list[list] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(
                input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            segments.append([text, labels[start] != IGNORE_INDEX])
            start = i
    return segments


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _visible(text: str) -> str:
    """Control characters from the data shown escaped (a raw ESC would restyle the terminal)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def render_example(segments: list[list], color: bool) -> str:
    """Learned spans in green when `color`, else between [[ and ]]; indented 4 spaces."""
    parts = []
    for raw, learned in segments:
        text = _visible(raw)
        if learned:
            parts.append(f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]")
        else:
            parts.append(f"\x1b[2m{text}\x1b[0m" if color else text)
    return "\n".join("    " + line for line in "".join(parts).split("\n"))


def format_audit(audit: Audit, color: bool | None = None) -> str:
    """The human-readable report (plain text; ANSI colour only when stdout is a terminal)."""
    if color is None:
        color = sys.stdout.isatty()
    skipped = sum(audit.skipped.values())
    why = ", ".join(f"{_n(n)} {reason}" for reason, n in sorted(audit.skipped.items()) if n)
    lines = [
        f"Data audit: {audit.source} (template {audit.template}, --cutoff_len {audit.cutoff_len}, "
        f"--train_on_inputs {str(audit.train_on_inputs).lower()}, "
        f"--add_eos_token {str(audit.add_eos_token).lower()})",
        f"  rows: {_n(audit.rows_read)} read, {_n(audit.rows_kept)} kept, {_n(skipped)} skipped"
        + (f" ({why})" if why else ""),
        f"  split: {_n(audit.train_rows)} train / {_n(audit.val_rows)} validation (seed {audit.seed})",
    ]
    if audit.length_percentiles:
        p = audit.length_percentiles
        lines += [
            "  tokens per example before cutting (prompt + response + special tokens): "
            + ", ".join(f"{k} {_n(v)}" for k, v in p.items()),
            (
                f"  recommended --cutoff_len {audit.recommended_cutoff_len} "
                f"(fits {CUTOFF_COVERAGE}% of rows uncut)"
                if audit.advised_cutoff_len == audit.recommended_cutoff_len
                else f"  recommended --cutoff_len {audit.advised_cutoff_len}: the model's context "
                f"({CUTOFF_COVERAGE}% of rows would need {audit.recommended_cutoff_len}; longer rows are cut)"
            ),
        ]
    cut = "truncated" if audit.overlength == "truncate" else "over the limit"
    lines += [
        f"  rows {cut} at --cutoff_len {audit.cutoff_len}: {_n(audit.truncated_rows)} "
        f"({_pct(audit.truncated_share)}; --overlength {audit.overlength})",
        f"  learned (supervised) tokens: {_n(audit.supervised_tokens)} of "
        f"{_n(audit.total_tokens)} ({_pct(audit.supervised_share)})",
        f"  rows with zero learned tokens: {_n(audit.zero_supervised_rows)}"
        + (
            f" ({', '.join(audit.zero_supervised_positions)}"
            + (", ..." if audit.zero_supervised_rows > len(audit.zero_supervised_positions) else "")
            + ")"
            if audit.zero_supervised_rows
            else ""
        ),
    ]
    from lora_alpaca.data.conversations import conversation_lines

    lines += conversation_lines(audit)
    for note in audit.notes:
        lines.append(f"  note: {note}")
    mark = "in green" if color else "between [[ and ]]"
    for k, ex in enumerate(audit.examples, start=1):
        lines.append(f"  example {k} ({ex['position']}); learned tokens {mark}:")
        lines.append(render_example(ex["segments"], color))
    return "\n".join(lines)
