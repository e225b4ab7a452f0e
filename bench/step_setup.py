"""What bench/profile_step.py and bench/speed_variants.py share: one micro-step as the loop runs it.

A micro-step = forward of the project's model (bf16 frozen base + LoRA under autocast, packed
rows, chunked loss) + backward + gradient clip + AdamW step, on real Alpaca rows tokenized as
finetune.py does (bench_train.load_rows). The config fields here are the ones both scripts
take; each script's own config adds its fields by subclassing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lora_alpaca.cli import field


@dataclass
class StepConfig:
    base_model: str | None = field(None, "Base model folder (default: SmolLM2-135M-Instruct).")
    rows: int = field(4, "Rows per micro-batch (packed into one sequence).")
    cutoff_len: int = field(256, "Maximum tokens per row.")
    lora_r: int = field(8, "LoRA rank.")
    lora_dropout: float = field(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = field(["q_proj", "v_proj"], "LoRA target modules.")
    loss_chunk_size: int = field(256, "Chunked loss chunk (0 = full logits).")
    dtype: str = field("auto", "dtype as finetune.py's --dtype.", choices=["auto", "bf16", "fp32"])
    seed: int = field(42, "Row sampling seed.")
    keep_freed_memory: bool = field(
        True, "glibc keeps freed memory for the next step, as finetune.py sets on CPU."
    )


@dataclass
class StepBench:
    """The model, its micro-batches and one `micro_step(batch)` that trains on a batch."""

    model: torch.nn.Module
    batches: list[dict]
    precision: object
    trainable: list
    optimizer: torch.optim.Optimizer
    chunk: int | None

    def autocast(self):
        if self.precision.autocast:
            return torch.autocast("cpu", dtype=self.precision.autocast)
        return contextlib.nullcontext()

    def micro_step(self, batch: dict, optimizer_scope=contextlib.nullcontext) -> int:
        """Train on `batch`; `optimizer_scope()` wraps the optimizer step (the profiler's
        record_function labels it)."""
        from lora_alpaca.train.loss import causal_lm_loss_sum

        with self.autocast():
            loss, n = causal_lm_loss_sum(self.model, batch, self.chunk)
        (loss / max(n, 1)).backward()
        with optimizer_scope():
            self.optimizer_step()
        return int(batch["input_ids"].numel())

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def setup_step(cfg: StepConfig, n_batches: int) -> StepBench:
    """Load the model with LoRA the way finetune.py does and `n_batches` packed micro-batches."""
    from accelerate import Accelerator
    from bench_train import BenchConfig, load_rows

    from lora_alpaca.data.packing import pack_rows
    from lora_alpaca.models import load_model, load_tokenizer, resolve_base_model, resolve_precision
    from lora_alpaca.train.config import FinetuneConfig
    from lora_alpaca.train.lora_setup import add_lora

    ref = resolve_base_model(cfg.base_model)
    tok = load_tokenizer(ref)
    bcfg = BenchConfig(rows=cfg.rows * n_batches, val_rows=0, cutoff_len=cfg.cutoff_len,
                       seed=cfg.seed)  # fmt: skip
    rows, _ = load_rows(bcfg, tok)
    batches = [pack_rows(rows[i : i + cfg.rows]) for i in range(0, len(rows), cfg.rows)]
    fcfg = FinetuneConfig(base_model=ref.path, dtype=cfg.dtype, lora_r=cfg.lora_r,
                          lora_dropout=cfg.lora_dropout, packing=True,
                          lora_target_modules=list(cfg.lora_target_modules), output_dir="/tmp/x")  # fmt: skip
    device = Accelerator(cpu=True).device
    if cfg.keep_freed_memory:
        from lora_alpaca.train.cpu_memory import keep_freed_memory

        keep_freed_memory()
    precision = resolve_precision(cfg.dtype, device, "none")
    model = add_lora(load_model(ref, precision, "none", device), fcfg, quantized=False).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return StepBench(model, batches, precision, trainable, torch.optim.AdamW(trainable, lr=1e-5),
                     cfg.loss_chunk_size or None)  # fmt: skip
