"""Read an adapter folder for export (manifest, files, base model) and load the base and the
adapter the way export needs them. Its own module so the output writer can name
`AdapterInfo` without importing the merge logic."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.models import BaseModelRef, load_config, resolve_base_model
from lora_alpaca.prompts import PromptTemplate
from lora_alpaca.runfolder import (
    check_adapter_files,
    check_base_fingerprint,
    read_manifest,
    template_from_manifest,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class AdapterInfo:
    """Everything export needs to know about one adapter folder, checked up front."""

    dir: Path
    manifest: dict
    template: PromptTemplate
    base: BaseModelRef
    run: dict | None  # run.json, when training finished writing it
    quantization: str  # how the base was loaded during training: none, 8bit, 4bit
    stop_strings: tuple[str, ...]  # as the manifest records them (may extend the template's)


def read_adapter(
    lora_weights: str,
    base_model: str | None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> AdapterInfo:
    """Validate the adapter folder and its base model; every problem is one UsageError line."""
    if not lora_weights:
        raise UsageError("--lora_weights is required: the output folder of finetune.py")
    manifest = read_manifest(lora_weights)
    adapter_dir = Path(lora_weights)
    check_adapter_files(adapter_dir, allow_pickle, "--allow_pickle")
    spec = base_model or manifest["base_model"]["path"]
    if not base_model and not Path(spec).exists():
        raise UsageError(
            f"--lora_weights {lora_weights}: its base model {spec!r} is not on this machine; "
            "pass --base_model with a local copy of it"
        )
    base = resolve_base_model(spec)
    check_base_fingerprint(manifest, load_config(base, trust_remote_code), base.name)
    template = template_from_manifest(manifest)
    run = None
    if (adapter_dir / "run.json").is_file():
        try:
            run = json.loads((adapter_dir / "run.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            run = None  # provenance only: a damaged run.json must not block an export
    return AdapterInfo(
        dir=adapter_dir,
        manifest=manifest,
        template=template,
        base=base,
        run=run,
        quantization=str(manifest.get("quantization") or "none"),
        stop_strings=tuple(manifest.get("stop_strings") or template.stop_strings),
    )


def load_tokenizer_for(info: AdapterInfo, trust_remote_code: bool = False):
    """The tokenizer as saved with the adapter (pad token as in training), else the base's."""
    from transformers import AutoTokenizer

    from lora_alpaca.models import load_tokenizer

    if any((info.dir / f).is_file() for f in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(info.dir, trust_remote_code=trust_remote_code)
    return load_tokenizer(info.base, trust_remote_code)


def load_base(
    info: AdapterInfo,
    quantization: str = "none",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """The base model in fp32 (merging in fp32 keeps the low-rank update exact), or loaded
    4-/8-bit exactly as training loaded it when the adapter's own outputs are the reference."""
    from transformers import AutoModelForCausalLM

    from lora_alpaca.models import quantization_config

    kwargs: dict = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    qconfig = quantization_config(quantization, torch.float32)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": "cpu"})
    try:
        model = AutoModelForCausalLM.from_pretrained(info.base.path, **kwargs)
    except pickle.UnpicklingError:
        # With --allow_pickle, transformers still unpickles .bin with weights_only=True.
        raise UsageError(
            f"--base_model {info.base.name}: its pickled .bin weights hold objects other than "
            "tensors (refused: unpickling them could run code); use a safetensors copy"
        ) from None
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        hint = (
            "; its weights may be pickled .bin files (pass --allow_pickle if you trust them)"
            if not allow_pickle
            else ""
        )
        raise UsageError(
            f"--base_model {info.base.name}: could not load its weights ({msg}){hint}"
        ) from None
    model.eval()
    return model


def attach_adapter(base, info: AdapterInfo):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(info.dir), is_trainable=False)
    except pickle.UnpicklingError:
        # peft unpickles a .bin adapter with weights_only=True, even after --allow_pickle.
        raise UsageError(
            f"--lora_weights {info.dir}: adapter_model.bin holds objects other than tensors "
            "(refused: unpickling them could run code); use a safetensors adapter"
        ) from None
    model.eval()
    return model
