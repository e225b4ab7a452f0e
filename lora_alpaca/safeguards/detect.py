"""`generate.py --detect_watermark FILE.jsonl --output_file OUT.jsonl`: score every text.

Each input row is a JSON object whose text is in `response` (what file mode writes) or
`text`; each output row keeps the row's `id` (if any) and adds transformers'
`WatermarkDetector` figures and a verdict. Texts with fewer than `min_tokens` scored tokens
get `prediction: null` and `verdict: "too_short"`: the z-test says little on a handful of tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.safeguards.watermark import WatermarkSettings

TEXT_FIELDS = ("response", "text")


def read_texts(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--detect_watermark: no such file {path!r}")
    rows = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--detect_watermark {path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"--detect_watermark {path} line {n}: invalid JSON ({e.msg})"
            ) from None
        field = next((f for f in TEXT_FIELDS if isinstance(obj, dict) and f in obj), None)
        if field is None or not isinstance(obj[field], str):
            raise UsageError(
                f"--detect_watermark {path} line {n}: needs a string 'response' or 'text'"
            )
        rows.append({"line": n, "id": obj.get("id"), "text": obj[field]})
    if not rows:
        raise UsageError(f"--detect_watermark {path}: no rows")
    return rows


class Detector:
    """transformers' WatermarkDetector on re-tokenized text (the prompt is not needed: each
    token's green list is seeded by the tokens before it inside the text itself)."""

    def __init__(self, model_config, tokenizer, settings: WatermarkSettings,
                 z_threshold: float = 4.0, min_tokens: int = 16):  # fmt: skip
        from transformers import WatermarkDetector

        self.tokenizer = tokenizer
        self.settings = settings
        self.z_threshold = z_threshold
        self.min_tokens = min_tokens
        # Repeated n-grams count once: a looping answer would otherwise pile up the same
        # green (or red) pair and push z far from what independent tokens would give.
        self.detector = WatermarkDetector(
            model_config, "cpu", settings.transformers_config(), ignore_repeated_ngrams=True
        )

    def score(self, text: str) -> dict:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        width = self.settings.context_width
        if len(ids) - width < 1:
            return self._too_short(0)
        out = self.detector(torch.tensor([ids]), z_threshold=self.z_threshold, return_dict=True)
        n = int(out.num_tokens_scored[0])
        if n < self.min_tokens:
            return self._too_short(n, float(out.z_score[0]), float(out.green_fraction[0]))
        z = float(out.z_score[0])
        return {
            "z_score": round(z, 4),
            "p_value": float(out.p_value[0]),
            "green_fraction": round(float(out.green_fraction[0]), 4),
            "num_tokens_scored": n,
            "prediction": bool(z > self.z_threshold),
            "verdict": "watermarked" if z > self.z_threshold else "not_watermarked",
        }

    def _too_short(self, n: int, z: float = math.nan, green: float = math.nan) -> dict:
        return {
            "z_score": None if math.isnan(z) else round(z, 4),
            "p_value": None,
            "green_fraction": None if math.isnan(green) else round(green, 4),
            "num_tokens_scored": n,
            "prediction": None,
            "verdict": "too_short",
        }


def detect_rows(detector: Detector, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        head = {"line": r["line"]} if r["id"] is None else {"id": r["id"], "line": r["line"]}
        out.append({**head, **detector.score(r["text"])})
    return out


def summary(scored: list[dict], threshold: float) -> str:
    judged = [r for r in scored if r["prediction"] is not None]
    hits = sum(r["prediction"] for r in judged)
    short = len(scored) - len(judged)
    return f"[watermark] {hits} of {len(judged)} judged texts watermarked at z > {threshold}" + (
        f"; {short} too short to judge" if short else ""
    )
