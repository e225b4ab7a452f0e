"""The probe report: cheap health signs of a model's answers to a batch of prompts.

- ended: share of answers that ended on their own (EOS or a template stop string), not
  by hitting max_new_tokens. An adapter that learned the format should end nearly always.
- header leak: share of answers that, after stop strings were cut, still contain a
  template-like header (`### Instruction`, `Response:` at a line start...): the model is
  imitating the prompt format instead of answering.
- repetition: mean share of repeated word 4-grams within an answer (0 = none; a loop
  like "the the the" tends to 1), and the share of answers above 0.5 (degenerate).
- mean length in words and in new tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

HEADER_RE = re.compile(r"^\s*(#{1,6}\s*)?(instruction|input|response)\s*:|^\s*#{3}\s", re.I | re.M)


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """1 - distinct/total word n-grams; 0.0 for answers shorter than n words."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def leaks_header(text: str, stop_strings: Sequence[str] = ()) -> bool:
    return bool(HEADER_RE.search(text)) or any(s and s in text for s in stop_strings)


@dataclass(frozen=True)
class ProbeReport:
    rows: int
    ended_share: float
    eos_share: float
    stop_string_share: float
    length_share: float
    header_leak_share: float
    repeated_4gram_mean: float
    degenerate_share: float
    mean_words: float
    mean_new_tokens: float
    empty_share: float

    def as_dict(self) -> dict:
        return asdict(self)


def probe(rows: Sequence[dict], stop_strings: Sequence[str] = ()) -> ProbeReport:
    """`rows` as written by batch generation: `response`, `finish_reason`, `new_tokens`."""
    n = len(rows)
    if n == 0:
        raise ValueError("probe needs at least one row")

    def share(pred) -> float:
        return sum(1 for r in rows if pred(r)) / n

    reps = [repeated_ngram_share(r["response"]) for r in rows]
    return ProbeReport(
        rows=n,
        ended_share=share(lambda r: r["finish_reason"] in ("eos", "stop_string")),
        eos_share=share(lambda r: r["finish_reason"] == "eos"),
        stop_string_share=share(lambda r: r["finish_reason"] == "stop_string"),
        length_share=share(lambda r: r["finish_reason"] == "length"),
        header_leak_share=share(lambda r: leaks_header(r["response"], stop_strings)),
        repeated_4gram_mean=sum(reps) / n,
        degenerate_share=sum(1 for x in reps if x > 0.5) / n,
        mean_words=sum(len(r["response"].split()) for r in rows) / n,
        mean_new_tokens=sum(r.get("new_tokens", 0) for r in rows) / n,
        empty_share=share(lambda r: not r["response"].strip()),
    )


def report_markdown(report: ProbeReport, title: str, setup: str) -> str:
    """A small Markdown table for bench/results/ and BENCHMARKS.md."""
    r = report

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    lines = [
        f"### {title}",
        "",
        setup,
        "",
        "| measure | value |",
        "|---|---|",
        f"| prompts | {r.rows} |",
        f"| ended on its own (EOS or stop string) | {pct(r.ended_share)} |",
        f"| &nbsp;&nbsp;by EOS | {pct(r.eos_share)} |",
        f"| &nbsp;&nbsp;by a template stop string | {pct(r.stop_string_share)} |",
        f"| cut by max_new_tokens | {pct(r.length_share)} |",
        f"| leaks a template header | {pct(r.header_leak_share)} |",
        f"| repeated word 4-grams (mean share) | {r.repeated_4gram_mean:.3f} |",
        f"| degenerate (>50% repeated 4-grams) | {pct(r.degenerate_share)} |",
        f"| empty answers | {pct(r.empty_share)} |",
        f"| mean length | {r.mean_words:.1f} words, {r.mean_new_tokens:.1f} tokens |",
        "",
    ]
    return "\n".join(lines)
