"""Writing an export folder: a private temp folder renamed into place at the end, the
transformers checkpoint (sharded safetensors, config, generation config, tokenizer) and a
short model card naming base, adapter, template and training data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_alpaca.constants import DTYPES
from lora_alpaca.errors import UsageError
from lora_alpaca.export.adapter import AdapterInfo
from lora_alpaca.fileio import check_writable_dir, expand_user, temp_dir_beside


def export_bytes(base_dir: str, dtype: str, gguf_types: list[str], transformers: bool) -> int:
    """Rough size of an export, for the free-space check before merging: the base model's
    parameter count (from its safetensors headers, no load) times the bytes per weight of
    each file written, plus 64 MB (tokenizer, card, parity report). 0 when the base folder
    holds no safetensors (then only writability is checked)."""
    from lora_alpaca.filecheck import safetensors_header

    params = 0
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        for k, v in safetensors_header(f, "--base_model").items():
            if k != "__metadata__":
                n = 1
                for d in v.get("shape", []):
                    n *= int(d)
                params += n
    if not params:
        return 0
    per_weight = (4 if dtype == "fp32" else 2) if transformers else 0
    per_weight += sum({"f16": 2, "q8_0": 1.07}.get(q, 2) for q in gguf_types)
    return int(params * per_weight) + 64 * 1024 * 1024


def prepare_output(output_dir: str, must_be_empty: bool = True, need_bytes: int = 0) -> Path:
    """A private temp folder beside `output_dir`; refuses to touch an existing non-empty one,
    an unwritable folder and a disk without `need_bytes` free."""
    if not output_dir:
        raise UsageError("--output_dir is required: where to write the merged model")
    out = expand_user(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {output_dir}: exists and is not a folder")
    if must_be_empty and out.is_dir() and any(out.iterdir()):
        raise UsageError(
            f"--output_dir {output_dir}: folder exists and is not empty; choose a new folder"
        )
    # read-only, /proc, a parent that is a file, too little free space
    check_writable_dir("--output_dir", out, need_bytes, "the merged model, estimated")
    return temp_dir_beside(out)


def publish(tmp: Path, output_dir: str) -> Path:
    """Make the export readable (never world-writable) and move it into place in one rename."""
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)
    os.chmod(tmp, 0o755)
    out = expand_user(output_dir)
    if out.is_dir():
        out.rmdir()  # empty (checked in prepare_output); rename cannot replace a folder
    tmp.rename(out)
    return out


def generation_config_for(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No `stop_strings` here: transformers then demands `tokenizer=` in every
        # generate() call, which breaks plain `model.generate(**tok(...))` and pipelines.
        # The stop strings live in lora_alpaca.json and the model card instead.
    )


def write_hf_folder(
    merged, tokenizer, info: AdapterInfo, out: Path, dtype: str, max_shard_size: str
) -> None:
    """Sharded safetensors + config + generation config + tokenizer files.

    Casts `merged` in place, so anything that wants the fp32 merge (the GGUF writer) runs first.
    """
    merged.to(DTYPES[dtype])
    merged.config.dtype = DTYPES[dtype]
    merged.generation_config = generation_config_for(tokenizer)
    try:
        merged.save_pretrained(out, max_shard_size=max_shard_size)
    except ValueError as e:
        raise UsageError(
            f"--max_shard_size {max_shard_size}: {' '.join(str(e).split())[:160]}"
        ) from None
    tokenizer.save_pretrained(out)


MODEL_CARD = """---
base_model: {base_json}
library_name: transformers
tags: [lora-alpaca, lora, merged]
---
# {adapter_name} (merged)

A LoRA adapter merged into its base model by lora-alpaca's `export_hf_checkpoint.py`.

- **Base model:** {base}
- **Adapter:** {adapter} (r={r}, targets {targets})
- **Base quantization in training:** {quantization}; merged onto the {merge_base} base weights
- **Prompt template:** {template} ({description})
- **Training data:** {data}
- **Exported as:** {formats}

## Prompt format

The model answers prompts in the format it was fine-tuned on:

```
{prompt}
```

Stop generating at: {stops}.

## Parity

`parity.json` compares this export with the adapter on its base model (max |logit
difference|, top-1 agreement, greedy continuations).
"""


def model_card(info: AdapterInfo, record: dict) -> str:
    data = (info.run or {}).get("data") or {}
    lora = info.manifest.get("lora") or {}
    base = info.manifest["base_model"]["name"]
    formats = [record["dtype"] + " safetensors"] if record["transformers"] else []
    return MODEL_CARD.format(
        base_json=json.dumps(base),
        base=base,
        adapter_name=info.dir.resolve().name,
        adapter=info.dir.resolve(),
        # The manifest stores the finetune flags (lora_r, lora_target_modules).
        r=lora.get("lora_r", lora.get("r")),
        targets=", ".join(lora.get("lora_target_modules") or lora.get("target_modules") or []),
        quantization=info.quantization,
        merge_base=record["merge_base"],
        template=info.template.name,
        description=info.template.description,
        data=f"{data['path']} ({data.get('train_rows')} train / {data.get('val_rows')} validation rows)"
        if data.get("path")
        else "unknown (no run.json)",
        formats=", ".join(
            formats
            + [f"GGUF {q}" for q in record["gguf"]]
            + ([f"LoRA GGUF {record['gguf_lora']} + base GGUF"] if record.get("gguf_lora") else [])
        ),
        prompt=info.template.prompt_no_input,
        stops=", ".join(repr(s) for s in info.stop_strings),
    )
