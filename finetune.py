#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA / QLoRA on Alpaca-format data.

    python finetune.py --data alpaca_data.json
    torchrun --nproc_per_node 2 finetune.py --data alpaca_data.json   # DDP

Every flag, its default and its meaning: `python finetune.py --help`.
The work happens in lora_alpaca/train/run.py (setup -> train -> cleanup).
"""

from lora_alpaca.cli import run
from lora_alpaca.train.app import command

if __name__ == "__main__":
    run(command)
