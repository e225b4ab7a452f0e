"""The training run: setup -> train -> cleanup (torchtune style, read it top to bottom).

The loop is ours (not HF Trainer) because the guarantees we make need control of it:
padding-free packed micro-batches, a loss normalized per learned token across the whole
accumulation window and all processes, atomic checkpoints with the exact data position,
a sentinel for NaN / zero loss / zero learning rate, and a clean save on SIGINT/SIGTERM.
accelerate does what it is good at: process groups and DDP/FSDP wrapping under
`torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora_alpaca.data.packing import count_supervised, pack_rows, pad_rows
from lora_alpaca.errors import UsageError
from lora_alpaca.log import log
from lora_alpaca.progress import duration, run_estimate, step_bar
from lora_alpaca.train import checkpoint as ckpt
from lora_alpaca.train import distributed
from lora_alpaca.train.config import RESUME_KEYS, FinetuneConfig
from lora_alpaca.train.loss import causal_lm_loss_sum

DiskFull = ckpt.DiskFull  # raised by checkpoint saves; run_finetune reports it


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


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next window of rows to train on."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    history: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)


def epoch_windows(
    n_rows: int, lengths: list[int], cfg: FinetuneConfig, epoch: int
) -> list[list[int]]:
    """Row indices of every optimizer step of an epoch: a seeded shuffle (the same on every
    process and after every resume), cut into windows of exactly --batch_size rows. The
    remainder (< batch_size rows, different ones each epoch) waits for the next epoch."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    if cfg.group_by_length:
        mega = cfg.batch_size * 16
        order = [
            i
            for s in range(0, n_rows, mega)
            for i in sorted(order[s : s + mega], key=lambda j: -lengths[j])
        ]
    b = cfg.batch_size
    return [order[i * b : (i + 1) * b] for i in range(n_rows // b)]


def resume_fingerprint(cfg: FinetuneConfig, data_fingerprint: str) -> dict:
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    settings["data_fingerprint"] = data_fingerprint
    return json.loads(json.dumps(settings, default=str))


def check_resume(saved: dict, now: dict, force: bool) -> None:
    diff = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diff and not force:
        raise UsageError(
            "--resume_from_checkpoint: data or settings differ from the checkpoint ("
            + "; ".join(diff)
            + "); resume with the original flags, or pass --force_resume"
        )
    if diff:
        log(f"warning: resuming with changed settings: {'; '.join(diff)}")


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save, exit non-zero with the resume command."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint...",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _all_sum(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def evaluate(module: nn.Module, rows: list[dict], cfg, accelerator, autocast, batcher) -> float:
    """Mean loss per learned token over the validation rows (sharded across processes)."""
    module.eval()
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(0, len(mine), cfg.micro_batch_size):
            mb = mine[i : i + cfg.micro_batch_size]
            total += float(module(**batcher(mb)))
            count += count_supervised(mb)
    module.train()
    total, count = _all_sum(accelerator, [total, count])
    return total / max(count, 1)


def train_loop(
    cfg: FinetuneConfig,
    accelerator,
    peft_model,
    train_rows: list[dict],
    val_rows: list[dict],
    precision,
    pad_token_id: int,
    data_fp: str,
    resume: dict | None,
    log,
    on_metrics=None,
) -> Position:
    """The optimizer loop. Returns the final position (with loss history)."""
    from transformers import get_scheduler

    def batcher(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pack_rows(rows) if cfg.packing else pad_rows(rows, pad_token_id)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = [len(r["input_ids"]) for r in train_rows]
    steps_per_epoch = len(train_rows) // cfg.batch_size
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_epochs
    warmup = cfg.warmup_steps
    if warmup >= total_steps // 2 and warmup > 0:
        warmup = max(total_steps // 10, 1 if total_steps > 1 else 0)
        log(
            f"note: --warmup_steps {cfg.warmup_steps} is too long for a {total_steps}-step run; using {warmup}"
        )
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    per_rank = cfg.micro_batch_size * accum
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    pos = Position()
    if resume:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, resume["adapter"])  # FSDP shards it in prepare
        scheduler.load_state_dict(resume["scheduler"])
        ckpt.set_rng_state(resume["rng"])
        st = resume["trainer_state"]
        pos = Position(
            st["global_step"],
            st["epoch"],
            st["step_in_epoch"],
            st["tokens_seen"],
            st["history"],
            st["eval_history"],
        )
    module = LossModule(peft_model, cfg.loss_chunk_size)
    module, optimizer = accelerator.prepare(module, optimizer)
    if resume:  # after prepare: under FSDP each rank takes its shard of the saved state
        distributed.load_optimizer_state(peft_model, optimizer, resume["optimizer"], accelerator)
    # After prepare: FSDP2 replaced the parameters with sharded ones.
    clip_params = list(module.parameters())
    autocast = (
        (lambda: torch.autocast(accelerator.device.type, dtype=precision.autocast))
        if precision.autocast
        else contextlib.nullcontext
    )
    scaler = torch.amp.GradScaler("cuda") if precision.label == "fp16" else None
    log(
        f"training: {len(train_rows)} rows, {steps_per_epoch} steps/epoch, {total_steps} steps of {cfg.batch_size} rows "
        f"({cfg.micro_batch_size} x {accum} accumulation x {world} process(es)), dtype {precision.label}, "
        f"packing {'on' if cfg.packing else 'off'}, {sum(p.numel() for p in trainable):,} trainable parameters"
    )

    def save(position: Position) -> Path | None:
        # Collectives first (every rank): FSDP shards, and each rank's own RNG state.
        adapter = distributed.adapter_state(peft_model, accelerator)
        optim_state = distributed.optimizer_state(peft_model, optimizer, accelerator)
        rng = distributed.gather_rng_states(accelerator, ckpt.rng_state())
        if not accelerator.is_main_process:
            return None
        state = {
            "global_step": position.global_step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "tokens_seen": position.tokens_seen,
            "history": position.history,
            "eval_history": position.eval_history,
            "total_steps": total_steps,
            "resume_fingerprint": resume_fingerprint(cfg, data_fp),
        }
        peft_cfg = peft_model.peft_config["default"].to_dict()
        return ckpt.save_checkpoint(
            Path(cfg.output_dir),
            position.global_step,
            adapter,
            peft_cfg,
            optim_state,
            scheduler.state_dict(),
            rng,
            state,
            cfg.save_total_limit,
        )

    # Fault-injection hooks for the reliability tests: poison the loss, or have the process
    # send itself a real signal, right after a given step.
    nan_step = int(os.environ.get("LORA_ALPACA_FAULT_NAN_STEP", "0"))
    signal_step = int(os.environ.get("LORA_ALPACA_FAULT_SIGNAL_STEP", "0"))
    row_log = os.environ.get("LORA_ALPACA_ROW_LOG")  # which rows each step trained on
    # The pre-training evaluation gets its own lines, before the bar exists: on CPU it can
    # take minutes, and inside the bar it would sit at 0/N and spoil the first rate.
    eval_s = 0.0
    if val_rows and pos.global_step == 0:
        log(f"evaluating on {len(val_rows):,} validation rows before training ...")
        started = time.time()
        ev = evaluate(module, val_rows, cfg, accelerator, autocast, batcher)
        eval_s = time.time() - started
        pos.eval_history.append({"step": 0, "eval_loss": ev})
        log(f"step 0/{total_steps} | eval loss {ev:.4f} (before training, {duration(eval_s)})")
    bar = step_bar(total_steps, pos.global_step, accelerator.is_main_process)
    # Rates and the bar are timed from here: the first optimizer step.
    zero_streak, t0, tokens_at_start = 0, time.time(), pos.tokens_seen
    first_step = pos.global_step + 1
    module.train()
    with StopFlag() as stop:
        while pos.global_step < total_steps:
            windows = epoch_windows(len(train_rows), lengths, cfg, pos.epoch)
            if pos.step_in_epoch >= len(windows):
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                continue
            window = windows[pos.step_in_epoch]
            mine = [train_rows[i] for i in window[rank * per_rank : (rank + 1) * per_rank]]
            micro = [
                mine[i : i + cfg.micro_batch_size]
                for i in range(0, len(mine), cfg.micro_batch_size)
            ]
            n_sup, n_tok = _all_sum(
                accelerator,
                [sum(count_supervised(mb) for mb in micro), sum(len(r["input_ids"]) for r in mine)],
            )
            step_loss = 0.0
            for k, mb in enumerate(micro):
                sync = (
                    contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(module)
                )
                with sync:
                    with autocast():
                        loss_sum = module(**batcher(mb))
                    # DDP averages gradients over processes; scale so the result is the
                    # mean over every learned token of the whole effective batch.
                    loss = loss_sum * (world / max(n_sup, 1))
                    (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss_sum.detach().item()
            step_loss = _all_sum(accelerator, [step_loss])[0] / max(n_sup, 1)
            if nan_step and pos.global_step + 1 == nan_step:
                step_loss = float("nan")
            if not math.isfinite(step_loss):
                raise TrainingStopped(
                    f"loss is {step_loss} at step {pos.global_step + 1} (lr {scheduler.get_last_lr()[0]:.2e}); "
                    "the update was not applied and the last good checkpoint is kept. Try a lower --learning_rate, "
                    "--dtype bf16 or fp32 instead of fp16, or --max_grad_norm 1.0"
                )
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(clip_params, cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos.global_step += 1
            pos.step_in_epoch += 1
            pos.tokens_seen += int(n_tok)
            if row_log and accelerator.is_main_process:
                with open(row_log, "a") as fh:
                    fh.write(
                        json.dumps({"step": pos.global_step, "epoch": pos.epoch, "rows": window})
                        + "\n"
                    )
            zero_streak = zero_streak + 1 if step_loss == 0.0 else 0
            if zero_streak >= 5:
                raise TrainingStopped(
                    "loss has been exactly 0 for 5 steps: nothing is being learned (all labels masked, "
                    "or an fp16 overflow, alpaca-lora #170); check the audit and --dtype"
                )
            if lr == 0.0 and pos.global_step > warmup + 1 and pos.global_step < total_steps:
                raise TrainingStopped(
                    f"learning rate is 0 at step {pos.global_step}, after warmup: check --learning_rate and --lr_scheduler"
                )
            rate = (pos.tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
            if pos.global_step == first_step and pos.global_step < total_steps:
                log(run_estimate(time.time() - t0, pos.global_step, total_steps, eval_s,
                                 cfg.eval_steps if val_rows else 0, accelerator.device.type == "cuda"), bar)  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
            if pos.global_step % cfg.logging_steps == 0 or pos.global_step == total_steps:
                pos.history.append(
                    {
                        "step": pos.global_step,
                        "loss": step_loss,
                        "lr": lr,
                        "tokens": pos.tokens_seen,
                        "tok_s": rate,
                    }
                )
                log(
                    f"step {pos.global_step}/{total_steps} | loss {step_loss:.4f} | lr {lr:.2e} | {rate:.0f} tok/s",
                    bar,
                )
                if on_metrics:
                    on_metrics(
                        pos.global_step,
                        {"train/loss": step_loss, "train/lr": lr, "train/tokens_per_s": rate},
                    )
            if val_rows and (
                pos.global_step % cfg.eval_steps == 0 or pos.global_step == total_steps
            ):
                ev = evaluate(module, val_rows, cfg, accelerator, autocast, batcher)
                pos.eval_history.append({"step": pos.global_step, "eval_loss": ev})
                log(f"step {pos.global_step}/{total_steps} | eval loss {ev:.4f}", bar)
                if on_metrics:
                    on_metrics(pos.global_step, {"eval/loss": ev})
            if signal_step and pos.global_step == signal_step:
                os.kill(os.getpid(), signal.SIGTERM)
            stop_now = _all_sum(accelerator, [float(stop.signum)])[0] > 0
            if (cfg.save_steps and pos.global_step % cfg.save_steps == 0) or stop_now:
                path = save(pos)
                if path:
                    log(f"checkpoint saved: {path}", bar)
            if stop_now:
                bar.close()
                raise InterruptedTraining(stop.signum or signal.SIGTERM, pos)
    bar.close()
    if val_rows and not pos.eval_history:
        pos.eval_history.append(
            {
                "step": pos.global_step,
                "eval_loss": evaluate(module, val_rows, cfg, accelerator, autocast, batcher),
            }
        )
    pos.wall_time_s = time.time() - t0
    pos.tokens_this_run = pos.tokens_seen - tokens_at_start
    return pos


class InterruptedTraining(Exception):
    def __init__(self, signum: int, position: Position):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.position = position
