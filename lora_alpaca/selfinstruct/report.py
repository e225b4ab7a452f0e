"""report.md + report.png: where the candidates went, how varied the kept tasks are, and
what the teacher cost (Stanford's paper shows the same kinds of figures)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lora_alpaca.fileio import write_text_atomic

REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def first_words(tasks: list[dict]) -> Counter:
    """Lowercased first word of each instruction: a cheap proxy for the verb."""
    words = Counter()
    for t in tasks:
        parts = t["instruction"].split()
        if parts:
            words[parts[0].strip(".,:;!?\"'").lower()] += 1
    return words


def max_similarities(tasks: list[dict]) -> list[float]:
    return [max(t["most_similar_instructions"].values(), default=0.0) for t in tasks]


def _plot(path: Path, state: dict, tasks: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    reasons = sorted(state["rejected"].items(), key=lambda kv: -kv[1])
    axes[0].barh([r for r, _ in reasons][::-1], [c for _, c in reasons][::-1], color="tab:red")
    axes[0].set_title(f"Rejected candidates ({sum(state['rejected'].values())})")
    verbs = first_words(tasks).most_common(20)
    axes[1].barh([w for w, _ in verbs][::-1], [c for _, c in verbs][::-1], color="tab:blue")
    axes[1].set_title(f"First words of kept instructions ({len(first_words(tasks))} distinct)")
    axes[2].hist(max_similarities(tasks), bins=20, range=(0, 1), color="tab:green")
    axes[2].set_title("ROUGE-L to the most similar earlier instruction")
    axes[2].set_xlabel("ROUGE-L F")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, state: dict, limit: int, teacher: str, price: float | None) -> Path:
    tasks = state["kept"][:limit]
    usage = state["usage"]
    total_tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    rejected = sum(state["rejected"].values())
    lines = [
        "# Self-instruct report",
        "",
        f"Teacher: {teacher}. Rounds: {state['rounds']}, requests: {state['requests']}.",
        f"Candidates parsed: {state['candidates']}; kept: {len(state['kept'])} "
        f"(written: {len(tasks)}); rejected: {rejected}.",
        "",
        "## Rejection reasons",
        "",
        "| reason | count | example |",
        "|---|---|---|",
    ]
    for reason, count in sorted(state["rejected"].items(), key=lambda kv: -kv[1]):
        example = (state["rejected_samples"].get(reason) or [""])[0]
        example = " ".join(example.split())[:100].replace("|", "\\|")
        lines.append(f"| {reason} | {count} | {example} |")
    verbs = first_words(tasks)
    sims = max_similarities(tasks)
    lines += [
        "",
        "## Diversity",
        "",
        f"{len(verbs)} distinct first words among {len(tasks)} instructions; most common: "
        + ", ".join(f"{w} ({c})" for w, c in verbs.most_common(10)),
        "",
        f"ROUGE-L to the most similar earlier instruction: mean {sum(sims) / max(len(sims), 1):.3f}, "
        f"max {max(sims, default=0):.3f}.",
        f"With an input: {sum(1 for t in tasks if t['input'])} of {len(tasks)}.",
        "",
        "## Tokens and cost",
        "",
        f"Prompt tokens: {usage['prompt_tokens']:,}; answer tokens: {usage['completion_tokens']:,}; "
        f"total: {total_tokens:,} ({total_tokens / max(len(tasks), 1):,.0f} per kept task).",
    ]
    if price is not None:
        cost = total_tokens / 1000 * price
        lines.append(
            f"Cost at ${price}/1K tokens: ${cost:,.2f} (${cost / max(len(tasks), 1) * 1000:,.2f} per 1,000 kept tasks)."
        )
    lines += ["", f"![report]({REPORT_PNG})", ""]
    _plot(out_dir / REPORT_PNG, state, tasks)
    path = out_dir / REPORT_MD
    write_text_atomic(path, "\n".join(lines))
    return path
