"""Find, fingerprint and load a base model and its tokenizer (any causal LM via Auto classes)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_alpaca.constants import DTYPES
from lora_alpaca.default_model import (
    DEFAULT_BASE_MODEL,
    convert_gguf,
    default_model_path,
    gguf_cache_path,
)
from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import check_model_folder, shorten
from lora_alpaca.fileio import expand_user

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys that change with how a model was saved, not with what the model is.
VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "architectures",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "pad_token_id",
    "_commit_hash",
}


@dataclass(frozen=True)
class BaseModelRef:
    """What the user asked for (`name`, kept in manifests) and where it loads from."""

    name: str
    path: str


def resolve_base_model(spec: str | None) -> BaseModelRef:
    """None -> embedded default; a folder; a `.gguf` file (converted once); or a hub id."""
    if not spec:
        return BaseModelRef(DEFAULT_BASE_MODEL, str(default_model_path()))
    path = expand_user(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--base_model: no such GGUF file {spec!r}")
        return BaseModelRef(spec, str(convert_gguf(path, gguf_cache_path(path))))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--base_model {spec}: folder has no config.json (not a transformers model folder)"
            )
        check_model_folder(path, "--base_model")
        return BaseModelRef(spec, str(path.resolve()))
    if path.exists():
        raise UsageError(f"--base_model {spec}: not a model folder or .gguf file")
    if spec == DEFAULT_BASE_MODEL:
        return BaseModelRef(DEFAULT_BASE_MODEL, str(default_model_path()))
    if HUB_ID_RE.match(spec) and not spec.startswith((".", "/", "~")):
        offline_unless_hub_reachable()
        return BaseModelRef(spec, spec)  # a hub id: loading it needs network access
    raise UsageError(
        f"--base_model: no such folder {spec!r}; give a local model folder, a .gguf file, "
        "a Hugging Face hub id (org/name), or leave it out for the embedded default"
    )


def offline_unless_hub_reachable(timeout_s: float = 3.0) -> bool:
    """Before a hub id is loaded: if the hub cannot be reached within `timeout_s`, switch
    huggingface_hub/datasets to offline mode, so a cached model still loads and anything
    else fails at once in one line (instead of 30-50 s of retry messages). True if online."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True  # read once at import; the modules below check it
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return False


def config_fingerprint(config) -> str:
    """Stable hash of a model config: tells an adapter which base it was trained on."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _hub_error(ref: BaseModelRef, what: str, e: Exception) -> UsageError:
    if "trust_remote_code" in str(e) or "contains custom code" in str(e):
        return UsageError(
            f"--base_model {ref.name}: the model ships its own Python code, which runs only with "
            "--trust_remote_code (off by default: that code can do anything on this machine); "
            "pass it only if you trust the source"
        )
    if ref.path == ref.name and not Path(ref.path).exists():
        return UsageError(
            f"--base_model {ref.name}: could not load {what} from the Hugging Face hub "
            f"(offline or unknown id: {type(e).__name__}); download it and pass the local folder"
        )
    return UsageError(f"--base_model {ref.name}: could not load {what} ({shorten(e)})")


def load_config(ref: BaseModelRef, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(ref, "its config", e) from None


def load_tokenizer(ref: BaseModelRef, trust_remote_code: bool = False):
    """The base model's fast tokenizer, with a pad token that is not a trained-on EOS.

    Labels are built from our own masks, never from `input_ids == pad_token_id`, so even
    when pad must equal EOS the final EOS of every row stays supervised.
    """
    from transformers import AutoTokenizer

    path = Path(ref.path)
    if path.is_dir() and not any(
        (path / f).is_file()
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    ):
        raise UsageError(
            f"--base_model {ref.name}: folder has no tokenizer files (tokenizer.json or tokenizer.model)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise _hub_error(ref, "its tokenizer", e) from None
    if tok.eos_token_id is None:
        raise UsageError(
            f"--base_model {ref.name}: tokenizer defines no EOS token; training would never learn to stop"
        )
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return tok


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # AVX512-BF16 / AMX: oneDNN runs bf16 matmuls natively (2-6x fp32 here).
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return False


@dataclass(frozen=True)
class Precision:
    """How a run computes: dtype of the frozen base weights, and autocast dtype (or None)."""

    weights: torch.dtype
    autocast: torch.dtype | None
    label: str


def resolve_precision(dtype: str, device: torch.device, quantization: str = "none") -> Precision:
    """`auto`: bf16 where the device has bf16 units, fp16 on other GPUs, fp32 on other CPUs.

    LoRA weights always stay fp32 (peft's default); only the frozen base is stored in the
    low-precision dtype and matmuls run under autocast.
    """
    bf16_ok = bf16_supported(device)
    if dtype == "auto":
        if bf16_ok:
            dtype = "bf16"
        elif device.type == "cuda":
            dtype = "fp16"
        else:
            dtype = "fp32"
    if dtype == "bf16" and not bf16_ok:
        raise UsageError(
            f"--dtype bf16: this {device.type} has no bf16 support; use fp16, fp32 or auto"
        )
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError(
            "--dtype fp16: fp16 training is not supported on CPU; use bf16, fp32 or auto"
        )
    if dtype == "fp16" and quantization == "8bit" and device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            # alpaca-lora #170/#249: int8 + fp16 on pre-Ampere GPUs overflows to loss 0/NaN.
            warnings.warn(
                "8-bit base with fp16 on a pre-Ampere GPU is known to overflow (loss 0 or NaN); "
                "using fp32 for the non-quantized parts instead",
                stacklevel=2,
            )
            dtype = "fp32"
    weights = DTYPES[dtype]
    autocast = None if dtype == "fp32" else weights
    return Precision(weights=weights, autocast=autocast, label=dtype)


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UsageError(
            f"--quantization {quantization}: bitsandbytes is not installed; "
            "pip install bitsandbytes, or use --quantization none"
        ) from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise UsageError(f"--quantization {quantization!r}: allowed: 8bit, 4bit, none")


def load_model(
    ref: BaseModelRef,
    precision: Precision,
    quantization: str = "none",
    device: torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
):
    """Any causal LM through AutoModelForCausalLM, optionally 8-/4-bit via bitsandbytes."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    compute = precision.autocast or torch.float32
    qconfig = quantization_config(quantization, compute)
    kwargs = dict(
        dtype=precision.weights if qconfig is None else compute, trust_remote_code=trust_remote_code
    )
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except pickle.UnpicklingError:
        # transformers loads .bin weights with torch.load(weights_only=True), which refuses
        # pickles holding anything but tensors (they could run code): say so in one line.
        raise UsageError(
            f"--base_model {ref.name}: its pickled .bin weights hold objects other than tensors "
            "(refused: unpickling them could run code); use a safetensors copy of the model"
        ) from None
    except (OSError, ValueError) as e:
        if attn_implementation and "attn_implementation" in str(e):
            kwargs.pop("attn_implementation")
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
        else:
            raise _hub_error(ref, "its weights", e) from None
    if qconfig is None:
        model.to(device)
    return model
