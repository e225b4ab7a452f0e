#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA / QLoRA on Alpaca-format data.

    python finetune.py --data alpaca_data.json
    torchrun --nproc_per_node 2 finetune.py --data alpaca_data.json   # DDP

Every flag, its default and its meaning: `python finetune.py --help`.
The work happens in lora_alpaca/run_finetune.py (setup -> train -> cleanup).
"""

from lora_alpaca.cli import build_command, run
from lora_alpaca.train.config import FinetuneConfig
from lora_alpaca.train.run import run_training

HELP = """Fine-tune a base model with LoRA on Alpaca-format data and write a verified adapter.

The output folder receives the PEFT adapter (safetensors), lora_alpaca.json (base model,
template, stop strings: read by generate.py and export_hf_checkpoint.py), run.json, a
loss-curve PNG, and resumable checkpoints. Defaults follow alpaca-lora."""

command = build_command(FinetuneConfig, run_training, HELP)

if __name__ == "__main__":
    run(command)
