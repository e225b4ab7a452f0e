"""One optimizer step, the evaluation, and the sentinel: the pieces the loop calls.

Mixed precision has one code path: a GradScaler that is enabled only for fp16 (as
nanoGPT does). Disabled, scale() returns the loss, unscale_() and update() do nothing and
step() calls optimizer.step().
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lora_alpaca.data.packing import count_supervised, pack_rows, pad_rows
from lora_alpaca.train.loss import causal_lm_loss_sum


class TrainingStopped(Exception):
    """The sentinel stopped the run (NaN, zero loss, zero learning rate): exit code 3."""


class LossModule(nn.Module):
    """Forward = summed next-token loss; wrapping this (not the bare model) in DDP/FSDP
    keeps the chunked loss inside the wrapped forward, where gradient sync expects it."""

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size or None

    def forward(self, **batch):
        loss_sum, _ = causal_lm_loss_sum(self.model, batch, self.chunk_size)
        return loss_sum


class RunClock:
    """Times this process's second micro-batch of training, once, and hands its seconds and
    real tokens to `report` (the run's estimate). The first micro-batch is not timed: it pays
    the process's one-time costs (memory first touched, kernels set up for its shapes; timing
    it made the Quickstart's estimate 1.6-1.9x too long). Until 2026-12-07 the estimate timed
    two extra micro-batches before training, whose work was thrown away: 2 of the Quickstart's
    19 forward+backward passes; now it costs nothing but, on a GPU, one sync."""

    def __init__(self, report, cuda: bool):
        self.report, self.cuda, self.seen = report, cuda, 0

    @contextlib.contextmanager
    def micro_batch(self, rows: list[dict]):
        self.seen += 1
        if self.seen != 2:
            yield
            return
        started = self._now()
        yield
        self.report(self._now() - started, sum(len(r["input_ids"]) for r in rows))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # a CPU-GPU sync point, once per run: the timing needs the GPU done
        return time.perf_counter()


class _NoClock:
    @staticmethod
    def micro_batch(rows: list[dict]):
        return contextlib.nullcontext()


NO_CLOCK = _NoClock()


@dataclass
class Stepper:
    """What a step needs besides its rows: the wrapped module and its optimizer machinery."""

    accelerator: object
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast: object  # () -> context manager
    clip_params: list  # the prepared module's parameters (sharded under FSDP2)
    max_grad_norm: float
    packing: bool
    pad_token_id: int
    clock: object = NO_CLOCK  # a RunClock times one micro-batch for the run's estimate

    def batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pack_rows(rows) if self.packing else pad_rows(rows, self.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def forward_backward(self, micro: list[list[dict]], n_sup: int) -> torch.Tensor:
        """Gradients of the step's mean loss per learned token (over every process); returns
        this process's summed loss as a device tensor (no sync here)."""
        world = self.accelerator.num_processes
        total = torch.zeros((), device=self.accelerator.device)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            # DDP syncs gradients on the last micro-batch only.
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.module):
                with self.clock.micro_batch(mb):
                    with self.autocast():
                        loss_sum = self.module(**self.batch(mb))
                    # DDP averages gradients over processes; scale so the result is the mean
                    # over every learned token of the whole effective batch.
                    self.scaler.scale(loss_sum * (world / max(n_sup, 1))).backward()
            total += loss_sum.detach().float()
        return total

    def update(self) -> float:
        """Unscale, clip, step, schedule; returns the learning rate the step used."""
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.clip_params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr


def sum_across(accelerator, *values: torch.Tensor | float) -> list[float]:
    """Sum scalars over all processes with ONE all_reduce, and read them back once: this is
    a CPU-GPU sync point (one per optimizer step)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(())
                     for v in values])  # fmt: skip
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_step(
    stepper: Stepper, micro, n_sup: int, step: int, epoch: int, window, faults, stop, sentinel
) -> tuple[float, float, bool]:
    """One optimizer step over its micro-batches: (mean loss per learned token, lr, stop?).
    The update is applied only if the sentinel passes the loss."""
    loss_sum = stepper.forward_backward(micro, n_sup)
    loss_sum = faults.at_step(step, epoch, window, loss_sum)
    loss_sum, signum = sum_across(stepper.accelerator, loss_sum, float(stop.signum))
    loss = loss_sum / max(n_sup, 1)
    sentinel.check_loss(loss, step, stepper.scheduler.get_last_lr()[0])
    lr = stepper.update()
    sentinel.check_after(loss, lr, step)
    return loss, lr, signum > 0


class Sentinel:
    """Every reason to stop a run that is not learning, in one place: a NaN/Inf loss (before
    its update is applied), a loss of exactly 0 for 5 steps, a learning rate of 0 after warmup."""

    def __init__(self, warmup: int, total_steps: int):
        self.warmup, self.total_steps, self.zero_streak = warmup, total_steps, 0

    def check_loss(self, loss: float, step: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss is {loss} at step {step} (lr {lr:.2e}); the update was not applied and the "
                "last good checkpoint is kept. Try a lower --learning_rate, --dtype bf16 or fp32 "
                "instead of fp16, or --max_grad_norm 1.0"
            )

    def check_after(self, loss: float, lr: float, step: int) -> None:
        self.zero_streak = self.zero_streak + 1 if loss == 0.0 else 0
        if self.zero_streak >= 5:
            raise TrainingStopped(
                "loss has been exactly 0 for 5 steps: nothing is being learned (all labels masked, "
                "or an fp16 overflow, alpaca-lora #170); check the audit and --dtype"
            )
        if lr == 0.0 and self.warmup + 1 < step < self.total_steps:
            raise TrainingStopped(
                f"learning rate is 0 at step {step}, after warmup: check --learning_rate and --lr_scheduler"
            )


def evaluate(stepper: Stepper, rows: list[dict], micro_batch_size: int) -> float:
    """Mean loss per learned token over the validation rows (sharded across processes);
    one all_reduce and one sync in all."""
    acc = stepper.accelerator
    stepper.module.eval()
    mine = rows[acc.process_index :: acc.num_processes]
    total = torch.zeros((), device=acc.device)
    with torch.no_grad(), stepper.autocast():
        for i in range(0, len(mine), micro_batch_size):
            total += stepper.module(**stepper.batch(mine[i : i + micro_batch_size])).float()
    stepper.module.train()
    (total,) = sum_across(acc, total)
    return total / max(count_supervised(rows), 1)
