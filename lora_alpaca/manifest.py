"""The manifest written beside every adapter (`lora_alpaca.json`), read by generate/export.

It records what the adapter needs to be used correctly without the training command:
the base model (name, path, config fingerprint), the prompt template's full text, the
special token ids, the stop strings, and the tokenization settings.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import loads_json
from lora_alpaca.prompts import PromptTemplate, parse_template

MANIFEST_NAME = "lora_alpaca.json"
MANIFEST_FORMAT = "lora-alpaca-manifest/1"


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file + fsync + rename: a crash never leaves a half-written file."""
    from lora_alpaca.outpaths import refuse_non_regular_target

    path = Path(path)
    refuse_non_regular_target(path)  # rename would replace a symlink or device node
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent.resolve())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def build_manifest(
    *,
    base_model_name: str,
    base_model_path: str,
    base_config_fingerprint: str,
    model_type: str,
    template: PromptTemplate,
    tokenizer,
    train_on_inputs: bool,
    add_eos_token: bool,
    cutoff_len: int,
    quantization: str,
    dtype: str,
    lora: dict,
) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "base_model": {
            "name": base_model_name,
            "path": base_model_path,
            "config_fingerprint": base_config_fingerprint,
            "model_type": model_type,
        },
        "template": {"name": template.name, **template.to_dict()},
        "special_tokens": {
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token": tokenizer.bos_token,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "stop_strings": list(template.stop_strings),
        "train_on_inputs": train_on_inputs,
        "add_eos_token": add_eos_token,
        "cutoff_len": cutoff_len,
        "quantization": quantization,
        "dtype": dtype,
        "lora": lora,
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)


def read_manifest(adapter_dir: str | Path, flag: str = "--lora_weights") -> dict:
    """Load and sanity-check the manifest of an adapter folder; one-line errors."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise UsageError(f"{flag}: no such folder {str(adapter_dir)!r}")
    p = d / MANIFEST_NAME
    if not p.is_file():
        raise UsageError(
            f"{flag} {adapter_dir}: no {MANIFEST_NAME} (not a lora-alpaca output folder, or training did not finish)"
        )
    try:
        m = loads_json(p.read_text(encoding="utf-8"), str(p))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {adapter_dir}: {MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise UsageError(
            f"{flag} {adapter_dir}: {MANIFEST_NAME} has unknown format {m.get('format') if isinstance(m, dict) else None!r}"
        )
    return m


def template_from_manifest(manifest: dict) -> PromptTemplate:
    """The exact template the adapter was trained with (its text is stored, not just its name)."""
    t = dict(manifest["template"])
    name = t.pop("name")
    return parse_template(t, name, f"{MANIFEST_NAME} template")


def check_base_fingerprint(
    manifest: dict, base_config, base_name: str, force: bool = False
) -> None:
    """Refuse to put an adapter on a base model other than the one it was trained on."""
    from lora_alpaca.models import config_fingerprint

    want = manifest["base_model"]["config_fingerprint"]
    got = config_fingerprint(base_config)
    if want != got and not force:
        raise UsageError(
            f"--base_model {base_name}: adapter was trained on {manifest['base_model']['name']!r} "
            f"(config fingerprint {want}), this base has fingerprint {got}; "
            "pass the matching base model"
        )
