"""Load what the sampler and the CLI generate with: a base model, optionally a LoRA adapter
from a lora-alpaca output folder (base model and template taken from its manifest), or a
merged model folder, into a ready `TextGenerator`.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import check_adapter_shapes, loads_json
from lora_alpaca.generate.engine import TextGenerator
from lora_alpaca.log import log
from lora_alpaca.models import (
    BaseModelRef,
    load_config,
    load_model,
    load_tokenizer,
    resolve_base_model,
    resolve_precision,
)
from lora_alpaca.prompts import load_template
from lora_alpaca.runfolder import (
    ADAPTER_PICKLE,
    MANIFEST_NAME,
    check_adapter_files,
    check_base_fingerprint,
    read_manifest,
    template_from_manifest,
)


@dataclass(frozen=True)
class LoadRequest:
    base_model: str | None = None
    lora_weights: str | None = None
    prompt_template_name: str | None = None  # None: the manifest's template, else "alpaca"
    quantization: str = "none"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle_adapter: bool = False
    device: str | None = None  # None: cuda if available, else cpu


@dataclass
class Loaded:
    generator: TextGenerator
    description: str  # one line for logs and the page header
    adapter_manifest: dict | None = None  # --lora_weights' manifest, as read and checked here


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _merged_manifest(base_path: str) -> dict | None:
    """A merged model exported by export_hf_checkpoint.py keeps a copy of the manifest."""
    p = Path(base_path) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        m = loads_json(p.read_text(encoding="utf-8"), str(p))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--base_model {base_path}: {MANIFEST_NAME} is not valid JSON ({e})"
        ) from None
    return m if isinstance(m, dict) and "template" in m else None


def load_generator(req: LoadRequest) -> Loaded:
    """Everything from flags to a `TextGenerator`; user mistakes are one-line UsageErrors."""
    device = _device(req.device)
    manifest = read_manifest(req.lora_weights) if req.lora_weights else None
    if manifest is not None:
        adapter_dir = Path(req.lora_weights)
        check_adapter_files(adapter_dir, req.allow_pickle_adapter, "--allow_pickle_adapter")
        check_adapter_shapes(adapter_dir, "--lora_weights", manifest)
        # The manifest's path is where the base was at training time; --base_model overrides.
        spec = req.base_model or manifest["base_model"]["path"]
        if not req.base_model and not Path(spec).exists():
            spec = manifest["base_model"]["name"]
        ref = resolve_base_model(spec)
        if not req.base_model:  # show the name the user trained with, not a cache path
            ref = BaseModelRef(manifest["base_model"]["name"], ref.path)
        check_base_fingerprint(manifest, load_config(ref, req.trust_remote_code), ref.name)
    else:
        ref = resolve_base_model(req.base_model)
        manifest = _merged_manifest(ref.path)
    if req.prompt_template_name:
        template = load_template(req.prompt_template_name)
    elif manifest is not None:
        template = template_from_manifest(manifest)
    else:
        template = load_template("alpaca")

    # The adapter folder holds the tokenizer exactly as used in training (pad token set).
    tok_src = ref
    if req.lora_weights and (Path(req.lora_weights) / "tokenizer_config.json").is_file():
        tok_src = BaseModelRef(ref.name, str(Path(req.lora_weights)))
    tokenizer = load_tokenizer(tok_src, req.trust_remote_code)
    precision = resolve_precision(req.dtype, device, req.quantization)
    log(f"loading {ref.name} ({precision.label}, quantization {req.quantization}) on {device}")
    model = load_model(ref, precision, req.quantization, device, req.trust_remote_code)
    description = f"base {ref.name}"
    if req.lora_weights:
        from peft import PeftModel

        # peft reads adapter_model.safetensors when present (checked above), the pickle otherwise.
        try:
            model = PeftModel.from_pretrained(model, req.lora_weights, is_trainable=False)
        except pickle.UnpicklingError:
            # peft unpickles with weights_only=True even after --allow_pickle_adapter.
            raise UsageError(
                f"--lora_weights {req.lora_weights}: {ADAPTER_PICKLE} holds objects other than "
                "tensors (refused: unpickling them could run code); use a safetensors adapter"
            ) from None
        description = f"adapter {req.lora_weights} on {ref.name}"
    description += f", template {template.name}, {precision.label}"
    return Loaded(
        TextGenerator(model, tokenizer, template, device),
        description,
        manifest if req.lora_weights else None,
    )
