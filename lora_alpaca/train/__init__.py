"""Training: the finetune command's config, the run (setup -> loop -> outputs), the loop, the
loss, LoRA setup, checkpoints and the final output folder."""

from lora_alpaca.train.config import FinetuneConfig
from lora_alpaca.train.run import run_training

__all__ = ["FinetuneConfig", "run_training"]
