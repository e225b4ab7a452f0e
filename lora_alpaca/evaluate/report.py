"""report.md + win_rates.png for one evaluation: systems, set, counts, win rates with 95%
intervals (± 1.96 standard errors), the human tally when there is one, the probe of both
systems' answers, and the pairs where the judge was most decided either way (and where
judge and rater disagree)."""

from __future__ import annotations

from pathlib import Path

REPORT = "report.md"
CHART = "win_rates.png"


def agreement(judged: list[dict], votes: dict) -> dict:
    """Share of pairs with a decisive human vote and a decisive judge where they agree."""
    judge_side = {
        j["index"]: ("model" if j["p_model"] > 0.5 else "reference")
        for j in judged
        if j["p_model"] is not None and j["p_model"] != 0.5
    }
    both = [
        (v["winner"], judge_side[v["index"]])
        for v in votes.get("votes", [])
        if v["winner"] in ("model", "reference") and v["index"] in judge_side
    ]
    agree = sum(h == j for h, j in both)
    return {"pairs": len(both), "agreement": agree / len(both) if both else None}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tally_chart(t: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"{t['model']} wins", "ties", f"{t['reference']} wins"]
    values = [t["model_wins"], t["ties"], t["reference_wins"]]
    ax.barh(labels, values, color=["#4c72b0", "#999999", "#dd8452"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v}", va="center")
    ax.invert_yaxis()
    ax.set_title(f"{t['tally']} (sign test p = {t['sign_test_p']:.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _win_chart(results: dict, human: dict | None, path: Path) -> None:
    plt = _plt()
    names, values, errs = [], [], []
    for label, key in (("judge", "win_rate"), ("judge, discrete", "discrete_win_rate"),
                       ("judge, length-controlled", "length_controlled_win_rate")):  # fmt: skip
        if results.get(key) is not None:
            names.append(label)
            values.append(results[key])
            errs.append(1.96 * results["standard_error"] if key == "win_rate" else 0)
    if human and human.get("win_rate") is not None:
        names.append("human")
        values.append(human["win_rate"])
        errs.append(1.96 * human["standard_error"])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, values, xerr=errs, color="#4c72b0", capsize=4)
    ax.axvline(50, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel(f"win rate of {results['model']} over {results['reference']} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _probe_rows(rows: list[dict]) -> tuple[list[dict], bool]:
    known = all("finish_reason" in r for r in rows)
    return [
        {"response": r["output"], "finish_reason": r.get("finish_reason", "unknown"),
         "new_tokens": r.get("new_tokens", 0)}
        for r in rows
    ], known  # fmt: skip


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " …"


def write_report(out_dir: Path, pairs, results, judged, votes, model_rows, reference_rows) -> None:
    from lora_alpaca.evaluate.human import tally
    from lora_alpaca.fileio import write_text_atomic

    # Here, not at module level: generate/__init__ loads torch + transformers, and the human
    # page imports this module (tally_chart) when the last vote is cast.
    from lora_alpaca.generate.probe import probe

    human = tally(votes) if votes else None
    m, r = results["model"], results["reference"]
    lines = [f"# {m} vs {r}", "", f"Set: {results['dataset']}, {len(pairs)} pairs. "
             f"Judge: {results['judge']} (answer order drawn per pair, seed {results['seed']}).",
             "", "| measure | value |", "|---|---|"]  # fmt: skip

    def rate(key: str, se: bool = False) -> str:
        v = results.get(key)
        if v is None:
            return "n/a"
        if se:
            half = 1.96 * results["standard_error"]
            return f"{v:.1f}% (95% interval {v - half:.1f} to {v + half:.1f}; SE {results['standard_error']:.1f})"
        return f"{v:.1f}%"

    lines += [
        f"| judge win rate of {m} | {rate('win_rate', se=True)} |",
        f"| discrete win rate | {rate('discrete_win_rate')} ({results.get('n_wins', 0)} wins, "
        f"{results.get('n_ties', 0)} ties, {results.get('n_losses', 0)} losses) |",
        f"| length-controlled win rate | {rate('length_controlled_win_rate')} "
        f"(length coefficient {results.get('length_coefficient', 0):.2f}) |",
        f"| judgements read from logprobs / text / unreadable | {results['n_logprobs']} / "
        f"{results['n_text']} / {results['n_unparsed']} |",
        f"| judge's mean probability for label (A) (position bias; fair = 50%) | "
        f"{100 * (results['mean_p_label_a'] or 0):.0f}% |",
        f"| judge calls / cached, tokens in / out, cost | {results['usage']['calls']} / "
        f"{results['usage']['cached']}, {results['usage']['prompt_tokens']} / "
        f"{results['usage']['completion_tokens']}, {results['usage']['cost']:.4f} |",
    ]
    if human:
        lines.append(
            f"| human tally | {human['tally']} (sign test p = {human['sign_test_p']:.3g}) |"
        )
        agree = results.get("human_agreement", {})
        if agree.get("agreement") is not None:
            lines.append(
                f"| judge-human agreement | {100 * agree['agreement']:.0f}% of {agree['pairs']} pairs |"
            )
    lines += ["", f"![win rates]({CHART})", "", "## Probe of the answers", "",
              "| measure | " + m + " | " + r + " |", "|---|---|---|"]  # fmt: skip
    reports = []
    for rows in (model_rows, reference_rows):
        probe_rows, known = _probe_rows(rows[: len(pairs)])
        reports.append((probe(probe_rows), known))
    (pm, km), (pr, kr) = reports

    def both(fn, needs_reason=False) -> str:
        a = fn(pm) if (km or not needs_reason) else "not recorded"
        b = fn(pr) if (kr or not needs_reason) else "not recorded"
        return f"{a} | {b}"

    def pct(x):
        return f"{100 * x:.1f}%"

    lines += [
        f"| ended on its own (EOS / stop string) | {both(lambda p: pct(p.ended_share), True)} |",
        f"| cut by the length cap | {both(lambda p: pct(p.length_share), True)} |",
        f"| leaks a template header | {both(lambda p: pct(p.header_leak_share))} |",
        f"| degenerate repetition | {both(lambda p: pct(p.degenerate_share))} |",
        f"| mean length (words) | {both(lambda p: f'{p.mean_words:.0f}')} |",
    ]  # fmt: skip
    loss = results.get("held_out_loss") or {}
    if any(loss.values()):
        cell = [f"{v['loss']:.3f} ({v['rows']} rows)" if v else "not scored"
                for v in (loss.get("model"), loss.get("reference"))]  # fmt: skip
        lines.append(
            f"| held-out loss of the reference answers (per token) | {cell[0]} | {cell[1]} |"
        )
    lines += ["", "## Pairs where the judge was most decided", ""]
    by_index = {p["index"]: p for p in pairs}
    read = sorted((j for j in judged if j["p_model"] is not None), key=lambda j: j["p_model"])
    picks = [("for " + r, j) for j in read[:2]] + [("for " + m, j) for j in read[-2:][::-1]]
    if human:
        judge_side = {j["index"]: j for j in read}
        for v in votes["votes"]:
            j = judge_side.get(v["index"])
            if (
                j
                and v["winner"] in ("model", "reference")
                and (j["p_model"] > 0.5) != (v["winner"] == "model")
            ):
                picks.append(
                    (f"rater chose {m if v['winner'] == 'model' else r}, judge did not", j)
                )
                if len(picks) >= 7:
                    break
    for why, j in picks:
        p = by_index[j["index"]]
        lines += [f"**{why}** (P({m} better) = {j['p_model']:.2f}) — {_short(p['instruction'], 200)}", "",
                  f"- {m}: {_short(p['model_output'])}", f"- {r}: {_short(p['reference_output'])}", ""]  # fmt: skip
    _win_chart(results, human, out_dir / CHART)
    write_text_atomic(out_dir / REPORT, "\n".join(lines) + "\n")
