"""generate.py's safeguard flags -> a `Safeguards` for the engine, and the detector mode.

Everything here runs before the (slow) model load, so a bad keyword file or key file is one
line and no wait.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.safeguards.guard import Safeguards
from lora_alpaca.safeguards.moderation import build_backend
from lora_alpaca.safeguards.watermark import KEY_FILE_NAME, default_key_file, resolve_settings

API_KEY_ENV = ("MODERATION_API_KEY", "OPENAI_API_KEY")  # env only: flags show up in `ps`


def _watermark_settings(cfg, key_file: Path, create: bool):
    return resolve_settings(
        cfg.watermark_key,
        key_file,
        cfg.watermark_greenlist_ratio,
        cfg.watermark_bias,
        cfg.watermark_seeding_scheme,
        cfg.watermark_context_width,
        create,
    )


def build_safeguards(cfg) -> Safeguards | None:
    """None when neither --watermark nor --moderation is asked for (the engine's fast path)."""
    if cfg.watermark_key is not None and not cfg.watermark:
        raise UsageError("--watermark_key needs --watermark (or --detect_watermark)")
    if cfg.moderation_window < 1:
        raise UsageError(f"--moderation_window {cfg.moderation_window}: must be >= 1")
    if not cfg.moderation_refusal.strip():
        raise UsageError("--moderation_refusal: empty message")
    if cfg.moderation_timeout <= 0:
        raise UsageError(f"--moderation_timeout {cfg.moderation_timeout}: must be > 0")
    api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
    moderator = build_backend(
        cfg.moderation,
        cfg.moderation_keywords,
        cfg.moderation_api_base,
        cfg.moderation_threshold,
        cfg.moderation_model,
        cfg.moderation_timeout,
        api_key,
    )
    if cfg.moderation_keywords and cfg.moderation != "keywords":
        raise UsageError("--moderation_keywords needs --moderation keywords")
    if not cfg.watermark and moderator is None:
        return None
    mark = None
    if cfg.watermark:
        if cfg.mode == "greedy":
            print("[watermark] note: greedy answers carry a watermark too, but sampled ones "
                  "(--mode sample) carry a stronger one", file=sys.stderr)  # fmt: skip
        key_file = Path(
            cfg.watermark_key_file or default_key_file(cfg.output_file, cfg.loaded_adapter)
        )
        mark, where = _watermark_settings(cfg, key_file, create=True)
        print(f"[watermark] on: key from {where}, greenlist_ratio {mark.greenlist_ratio}, "
              f"bias {mark.bias}, {mark.seeding_scheme}/{mark.context_width}", file=sys.stderr)  # fmt: skip
    if moderator is not None:
        print(f"[moderation] on: {cfg.moderation}, checked on prompts and outputs every "
              f"{cfg.moderation_window} chars"
              + (" (fails OPEN when unreachable)" if cfg.moderation_fail_open else ""),
              file=sys.stderr)  # fmt: skip
    return Safeguards(
        watermark=mark,
        moderator=moderator,
        backend=cfg.moderation,
        refusal=cfg.moderation_refusal,
        window_chars=cfg.moderation_window,
        fail_open=cfg.moderation_fail_open,
    )


def detect_key_file(cfg) -> Path:
    """--watermark_key_file, else the first key file beside the texts, in the adapter, here."""
    if cfg.watermark_key_file:
        return Path(cfg.watermark_key_file)
    places = [Path(cfg.detect_watermark).resolve().parent]
    if cfg.loaded_adapter:  # the key lives in the adapter folder loaded by default
        places.append(Path(cfg.loaded_adapter))
    places.append(Path.cwd())
    found = next((p / KEY_FILE_NAME for p in places if (p / KEY_FILE_NAME).is_file()), None)
    return found or places[0] / KEY_FILE_NAME


def run_detect(cfg, load) -> int:
    """--detect_watermark FILE.jsonl --output_file OUT.jsonl; `load()` gives the generator
    (only its tokenizer and model config are used: both must match the generating ones)."""
    from lora_alpaca.fileio import check_output_file, write_jsonl_atomic
    from lora_alpaca.safeguards.detect import Detector, detect_rows, read_texts, summary

    if not cfg.output_file:
        raise UsageError("--detect_watermark needs --output_file OUT.jsonl")
    if cfg.prompt is not None or cfg.input_file:
        raise UsageError("--detect_watermark: give it alone, without --prompt / --input_file")
    if Path(cfg.output_file).resolve() == Path(cfg.detect_watermark).resolve():
        raise UsageError("--output_file: must differ from the --detect_watermark file")
    if cfg.watermark_min_tokens < 1:
        raise UsageError(f"--watermark_min_tokens {cfg.watermark_min_tokens}: must be >= 1")
    rows = read_texts(cfg.detect_watermark)
    out = check_output_file(
        "--output_file",
        cfg.output_file,
        {"--detect_watermark": cfg.detect_watermark},
        overwrite=cfg.overwrite_output_file,
    )
    settings, where = _watermark_settings(cfg, detect_key_file(cfg), create=False)
    print(f"[watermark] detecting with the key from {where}", file=sys.stderr)
    gen = load()
    detector = Detector(
        gen.model.config, gen.tokenizer, settings, cfg.watermark_z_threshold,
        cfg.watermark_min_tokens,
    )  # fmt: skip
    scored = detect_rows(detector, rows)
    write_jsonl_atomic(out, scored)
    print(summary(scored, cfg.watermark_z_threshold), file=sys.stderr)
    print(f"[watermark] wrote {len(scored)} rows to {out}", file=sys.stderr)
    return 0
