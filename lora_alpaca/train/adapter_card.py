"""The adapter folder's README.md: what was trained on what, how well, and how to load it.

Replaces peft's template card (a page of "[More Information Needed]") with facts the run
knows: base model, data, settings, the data audit's summary and the held-out loss.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_alpaca.progress import duration, loss

CARD = """---
base_model: {base_json}
library_name: peft
tags: [lora-alpaca, lora]
---
# {name}

A LoRA adapter for **{base}**, trained by lora-alpaca's `finetune.py`.

## Data

- **File:** {data_path} ({train_rows:,} training / {val_rows:,} held-out rows)
- **Audit:** {audit}
- **Prompt template:** {template} (the prompt ends with `{response_marker}`; the model was trained to answer after it)

## Settings

- **LoRA:** r={r}, alpha={alpha}, dropout={dropout}, targets {targets}
- **Training:** {steps} steps, batch {batch_size} (micro-batch {micro_batch_size}), learning rate {lr}, {epochs} epoch(s), cutoff {cutoff_len} tokens, {dtype}{quant}
- **Time:** {train_time} of training on {device}, {tok_s:,.0f} tokens/s

## Result

- **Held-out loss per learned token:** {eval_first} before training, {eval_last} after
- **Final training loss:** {train_last}

`loss_curve.png` plots both; `run.json` has every figure and setting.

## How to load it

```bash
python generate.py --lora_weights {folder} --prompt "Your instruction"
python export_hf_checkpoint.py --lora_weights {folder} --output_dir merged   # plain transformers model
```

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base_path_json})
model = PeftModel.from_pretrained(base, {folder_json})
tokenizer = AutoTokenizer.from_pretrained({folder_json})
```

Prompts must use the template above (`lora_alpaca.json` holds it and the stop strings).
"""


def audit_summary(audit: dict | None) -> str:
    if not audit:
        return "not recorded"
    skipped = sum((audit.get("skipped") or {}).values())
    parts = [f"{audit.get('rows_read', 0):,} rows read, {audit.get('rows_kept', 0):,} kept"]
    if skipped:
        parts.append(f"{skipped:,} skipped ({', '.join(sorted(audit['skipped']))})")
    parts.append(f"{audit.get('truncated_rows', 0):,} cut to --cutoff_len")
    total = audit.get("total_tokens") or 0
    if total:
        share = 100 * (audit.get("supervised_tokens") or 0) / total
        parts.append(f"{share:.1f}% of tokens learned")
    return ", ".join(parts)


def adapter_card(output_dir: Path, manifest: dict, run_info: dict) -> str:
    cfg = run_info.get("config") or {}
    data = run_info.get("data") or {}
    lora = manifest.get("lora") or {}
    evals = run_info.get("eval_history") or []
    base = manifest["base_model"]["name"]
    base_path = manifest["base_model"].get("path") or base
    targets = lora.get("lora_target_modules") or []
    quant = run_info.get("quantization")
    return CARD.format(
        base_json=json.dumps(base),
        base=base,
        name=Path(output_dir).resolve().name,
        data_path=data.get("path", cfg.get("data")),
        train_rows=data.get("train_rows", 0),
        val_rows=data.get("val_rows", 0),
        audit=audit_summary(run_info.get("audit")),
        template=(manifest.get("template") or {}).get("name", cfg.get("prompt_template_name")),
        response_marker=(manifest.get("template") or {}).get("response_split", "### Response:"),
        r=lora.get("lora_r"),
        alpha=lora.get("lora_alpha"),
        dropout=lora.get("lora_dropout"),
        targets=", ".join(targets) if isinstance(targets, list) else targets,
        steps=run_info.get("steps"),
        batch_size=cfg.get("batch_size"),
        micro_batch_size=cfg.get("micro_batch_size"),
        lr=cfg.get("learning_rate"),
        epochs=cfg.get("num_epochs"),
        cutoff_len=cfg.get("cutoff_len"),
        dtype=run_info.get("dtype"),
        quant=f", base quantized {quant}" if quant and quant != "none" else "",
        train_time=duration(run_info.get("train_time_s") or 0),
        device=run_info.get("device"),
        tok_s=run_info.get("tokens_per_s") or 0,
        eval_first=loss(evals[0]["eval_loss"]) if evals else "n/a",
        eval_last=loss(evals[-1]["eval_loss"]) if evals else "n/a",
        train_last=loss(run_info.get("final_train_loss")),
        folder=Path(output_dir).resolve(),
        folder_json=json.dumps(str(Path(output_dir).resolve())),
        base_path_json=json.dumps(str(base_path)),
    )
