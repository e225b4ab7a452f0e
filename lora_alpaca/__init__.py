"""lora-alpaca: low-cost LoRA / QLoRA instruction fine-tuning."""

__version__ = "0.1.0"
