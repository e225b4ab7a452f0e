"""`--export_preferences FILE.jsonl`: votes as `{prompt, chosen, rejected}` rows, the format
preference-tuning tools (DPO trainers) read. Ties, skips and unreadable judgements give no
row; a judge's probability counts as a vote for the side above 0.5. Each row also says
where it came from (`source`: human or judge) and the winning system."""

from __future__ import annotations

from pathlib import Path

from lora_alpaca.errors import UsageError


def check_export_path(path: str) -> Path:
    p = Path(path)
    if p.exists():
        raise UsageError(f"--export_preferences {path}: exists; give a new file name")
    if not p.parent.resolve().is_dir():
        raise UsageError(f"--export_preferences {path}: folder {str(p.parent)!r} does not exist")
    return p


def _row(pair: dict, winner: str, source: str) -> dict:
    model, ref = pair["model_output"], pair["reference_output"]
    chosen, rejected = (model, ref) if winner == "model" else (ref, model)
    gen = (
        pair["model_row"]["generator"] if winner == "model" else pair["reference_row"]["generator"]
    )
    return {
        "prompt": pair["instruction"],
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "chosen_generator": gen,
    }


def preference_rows(pairs: list[dict], judged: list[dict] | None, votes: dict | None) -> list[dict]:
    by_index = {p["index"]: p for p in pairs}
    rows = []
    for v in (votes or {}).get("votes", []):
        if v["winner"] in ("model", "reference") and v["index"] in by_index:
            rows.append(_row(by_index[v["index"]], v["winner"], "human"))
    for j in judged or []:
        p = j["p_model"]
        if p is not None and p != 0.5:
            rows.append(_row(by_index[j["index"]], "model" if p > 0.5 else "reference", "judge"))
    return rows


def export_preferences(path: str, pairs, judged, votes) -> int:
    from lora_alpaca.fileio import write_jsonl_atomic

    rows = preference_rows(pairs, judged, votes)
    write_jsonl_atomic(Path(path), rows)
    return len(rows)
