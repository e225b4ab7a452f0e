"""The manifest written beside every adapter (`lora_alpaca.json`), read by generate/export.

It records what the adapter needs to be used correctly without the training command:
the base model (name, path, config fingerprint), the prompt template's full text, the
special token ids, the stop strings, and the tokenization settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import write_json_atomic
from lora_alpaca.prompts import PromptTemplate, parse_template

MANIFEST_NAME = "lora_alpaca.json"
MANIFEST_FORMAT = "lora-alpaca-manifest/1"


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def check_adapter_files(adapter_dir: Path, allow_pickle: bool, opt_in_flag: str) -> None:
    """The adapter-folder check shared by generate and export: safetensors only, unless the
    user opts in with the command's `opt_in_flag` (generate: --allow_pickle_adapter, which
    covers the adapter alone; export: --allow_pickle, which also covers the base's weights),
    because a `.bin` adapter is a pickle, which can run arbitrary code when loaded."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UsageError(
            f"--lora_weights {adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder; "
            "training did not finish?)"
        )
    if (adapter_dir / ADAPTER_SAFETENSORS).is_file():
        return
    if (adapter_dir / ADAPTER_PICKLE).is_file():
        if allow_pickle:
            return
        raise UsageError(
            f"--lora_weights {adapter_dir}: only {ADAPTER_PICKLE} (a pickle, which can run code when "
            f"loaded); pass {opt_in_flag} if you trust its source"
        )
    raise UsageError(f"--lora_weights {adapter_dir}: no {ADAPTER_SAFETENSORS} in the folder")


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
        m = json.loads(p.read_text(encoding="utf-8"))
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
