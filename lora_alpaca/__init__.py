"""lora-alpaca: low-cost LoRA / QLoRA instruction fine-tuning."""

from lora_alpaca import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()
