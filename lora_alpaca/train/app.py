"""The finetune command: FinetuneConfig's fields are its flags, run_training its body."""

from lora_alpaca.cli import build_command, run
from lora_alpaca.train.config import FinetuneConfig
from lora_alpaca.train.run import run_training

HELP = """Fine-tune a base model with LoRA on Alpaca-format data and write a verified adapter.

The output folder receives the PEFT adapter (safetensors), lora_alpaca.json (base model,
template, stop strings: read by generate.py and export_hf_checkpoint.py), run.json, a
loss-curve PNG, and resumable checkpoints. Defaults follow alpaca-lora."""

command = build_command(FinetuneConfig, run_training, HELP)


def console_main() -> None:
    """The `lora-alpaca-finetune` console command (same flags as finetune.py)."""
    run(command)
