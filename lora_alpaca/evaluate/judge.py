"""`evaluate.py judge`: the model's answers against the reference's, judged pair by pair by
a judge model (an OpenAI-compatible endpoint or a local model), written to --output_dir:
judgements.json (every pair), results.json (win rates, usage, cost), report.md + PNG."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca import cli
from lora_alpaca.errors import UsageError
from lora_alpaca.evaluate.judge_prompt import is_swapped, judge_messages
from lora_alpaca.evaluate.sets import check_output_dir, pair_outputs, read_model_outputs
from lora_alpaca.evaluate.stats import length_controlled_win_rate, win_rates
from lora_alpaca.log import log
from lora_alpaca.progress import bar_enabled

F = cli.field
JUDGEMENTS = "judgements.json"
RESULTS = "results.json"
CACHE = "judge_cache.jsonl"


@dataclass
class JudgeConfig:
    model_outputs: str = F("", "Answers of the system evaluated (AlpacaEval JSON).")
    reference_outputs: str = F("", "Answers it is compared with, e.g. the base (AlpacaEval JSON).")
    output_dir: str = F(
        "", "Folder for judgements, results.json, report.md/PNG and the judge cache (reused)."
    )
    api_base: str | None = F(
        None, "Judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."
    )
    judge_model: str = F("", "Judge model name sent to --api_base.")
    judge_base_model: str | None = F(
        None,
        "Local judge instead of an endpoint: a model folder or name (label probabilities read directly).",
    )
    api_key_env: str = F("OPENAI_API_KEY", "Environment variable holding the judge's key.")
    seed: int = F(0, "Seed of the per-pair order of the two answers.")
    limit: int = F(0, "Judge only the first N pairs (0 = all).")
    price_input_per_million: float = F(
        0.0, "Judge price per million prompt tokens, for the cost line."
    )
    price_output_per_million: float = F(0.0, "Judge price per million completion tokens.")
    export_preferences: str | None = F(
        None,
        "Also write {prompt, chosen, rejected} JSONL from the judge (and human votes in --output_dir).",
    )


def check(cfg: JudgeConfig) -> Path:
    for flag in ("model_outputs", "reference_outputs", "output_dir"):
        if not getattr(cfg, flag):
            raise UsageError(f"--{flag} is required")
    if bool(cfg.api_base) == bool(cfg.judge_base_model):
        raise UsageError("give a judge: --api_base URL --judge_model NAME, or --judge_base_model")
    if cfg.api_base and not cfg.judge_model:
        raise UsageError("--api_base needs --judge_model (the model name the endpoint serves)")
    if cfg.limit < 0:
        raise UsageError(f"--limit {cfg.limit}: must be >= 0")
    if cfg.export_preferences:
        from lora_alpaca.evaluate.preferences import check_export_path

        check_export_path(cfg.export_preferences)
    return check_output_dir(cfg.output_dir)


def judge_pairs(pairs: list[dict], judge, cache, seed: int) -> tuple[list[dict], dict]:
    from tqdm import tqdm

    from lora_alpaca.evaluate.judges import JudgeCache

    usage = {"calls": 0, "cached": 0, "prompt_tokens": 0, "completion_tokens": 0}
    rows = []
    bar = tqdm(pairs, desc="judging", unit="pair", file=sys.stderr, disable=not bar_enabled())
    for pair in bar:
        swapped = is_swapped(pair["instruction"], seed)
        a, b = pair["model_output"], pair["reference_output"]
        if not swapped:
            a, b = b, a  # AlpacaEval's default: reference as (A), model as (B)
        messages = judge_messages(pair["instruction"], a, b)
        key = JudgeCache.key(judge.name, messages)
        verdict = cache.get(key)
        if verdict is None:
            verdict = judge.judge(messages)
            cache.put(key, verdict)
            usage["calls"] += 1
            usage["prompt_tokens"] += verdict.prompt_tokens
            usage["completion_tokens"] += verdict.completion_tokens
        else:
            usage["cached"] += 1
        p_model = None
        if verdict.p_b is not None:
            p_model = 1 - verdict.p_b if swapped else verdict.p_b
        rows.append(
            {
                "index": pair["index"],
                "instruction": pair["instruction"],
                "model_as": "A" if swapped else "B",
                "p_model": p_model,
                "p_label_a": None if verdict.p_b is None else 1 - verdict.p_b,
                "method": verdict.method,
                "judge_reply": verdict.reply,
                "model_length": len(pair["model_output"]),
                "reference_length": len(pair["reference_output"]),
            }
        )
    return rows, usage


def summarise(rows: list[dict]) -> dict:
    read = [r for r in rows if r["p_model"] is not None]
    prefs = [r["p_model"] for r in read]
    out = win_rates(prefs)
    if read:
        out.update(
            length_controlled_win_rate(
                prefs, [r["model_length"] for r in read], [r["reference_length"] for r in read]
            )
        )
    else:
        out["length_controlled_win_rate"] = None
    out["n_unparsed"] = len(rows) - len(read)
    # Position bias: a fair judge gives (A) about half the mass, since the order is random.
    out["mean_p_label_a"] = sum(r["p_label_a"] for r in read) / len(read) if read else None
    out["n_logprobs"] = sum(r["method"] == "logprobs" for r in rows)
    out["n_text"] = sum(r["method"] == "text" for r in rows)
    return out


def held_out(rows) -> dict | None:
    """The answers file's held-out loss (written by `evaluate.py answers` for local models)."""
    from lora_alpaca.evaluate.heldout import mean_loss

    scored = mean_loss(list(rows))
    return {"loss": scored[0], "rows": scored[1]} if scored else None


def main(cfg: JudgeConfig) -> int:
    from lora_alpaca.evaluate.human import read_votes
    from lora_alpaca.evaluate.judges import ApiJudge, JudgeCache, LocalJudge
    from lora_alpaca.evaluate.report import agreement, write_report
    from lora_alpaca.fileio import write_json_atomic

    out_dir = check(cfg)
    model_rows = read_model_outputs(cfg.model_outputs, "--model_outputs")
    reference_rows = read_model_outputs(cfg.reference_outputs, "--reference_outputs")
    pairs = pair_outputs(model_rows, reference_rows)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    if cfg.api_base:
        judge = ApiJudge(cfg.api_base, cfg.judge_model, cfg.api_key_env)
    else:
        judge = LocalJudge(cfg.judge_base_model)
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    try:
        rows, usage = judge_pairs(pairs, judge, JudgeCache(out_dir / CACHE), cfg.seed)
    except UsageError:
        if created:  # an unreachable judge leaves nothing behind
            shutil.rmtree(out_dir)
        raise
    usage["cost"] = (
        usage["prompt_tokens"] * cfg.price_input_per_million
        + usage["completion_tokens"] * cfg.price_output_per_million
    ) / 1e6
    results = {
        "model": model_rows[0]["generator"],
        "reference": reference_rows[0]["generator"],
        "judge": judge.name,
        "dataset": pairs[0]["dataset"] or "not recorded",
        "seed": cfg.seed,
        **summarise(rows),
        "held_out_loss": {
            side: held_out(p[f"{side}_row"] for p in pairs) for side in ("model", "reference")
        },
        "usage": usage,
    }
    votes = read_votes(out_dir)
    if votes:
        results["human_agreement"] = agreement(rows, votes)
    write_json_atomic(out_dir / JUDGEMENTS, rows)
    write_json_atomic(out_dir / RESULTS, results)
    write_report(out_dir, pairs, results, rows, votes, model_rows, reference_rows)
    if cfg.export_preferences:
        from lora_alpaca.evaluate.preferences import export_preferences

        n = export_preferences(cfg.export_preferences, pairs, rows, votes)
        log(f"wrote {n} preference pairs to {cfg.export_preferences}", tag="evaluate")
    lc = results["length_controlled_win_rate"]
    print(
        f"{results['model']} vs {results['reference']} judged by {judge.name}: win rate "
        f"{results['win_rate']:.1f}% ± {results['standard_error']:.1f}, discrete "
        f"{results['discrete_win_rate']:.1f}%, length-controlled {lc:.1f}% "
        f"({results['n']} pairs, {results['n_unparsed']} unreadable; {usage['calls']} judge "
        f"calls, {usage['cached']} cached) -> {out_dir / RESULTS}"
        if results["n"]
        else f"no readable judgement among {len(rows)} pairs -> {out_dir / RESULTS}"
    )
    return 0
