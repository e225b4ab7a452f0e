"""The training run: setup -> train -> cleanup (torchtune style, read it top to bottom).

The loop is ours (not HF Trainer) because the guarantees we make need control of it:
padding-free packed micro-batches, a loss normalized per learned token across the whole
accumulation window and all processes, atomic checkpoints with the exact data position,
a sentinel for NaN / zero loss / zero learning rate, and a clean save on SIGINT/SIGTERM.
accelerate does what it is good at: process groups and DDP/FSDP wrapping under
`torchrun` / `accelerate launch`. One optimizer step is `step.train_step`; this module
sets up its parts (one `_setup_*` per component) and runs the steps.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from lora_alpaca.data.packing import count_supervised
from lora_alpaca.errors import UsageError
from lora_alpaca.log import log
from lora_alpaca.progress import duration, run_estimate, step_bar
from lora_alpaca.train import checkpoint as ckpt
from lora_alpaca.train import distributed
from lora_alpaca.train.config import RESUME_KEYS, FinetuneConfig
from lora_alpaca.train.cpu_memory import keep_freed_memory
from lora_alpaca.train.faults import Faults
from lora_alpaca.train.step import (
    LossModule,
    RunClock,
    Sentinel,
    Stepper,
    TrainingStopped,
    evaluate,
    train_step,
)

DiskFull = ckpt.DiskFull  # raised by checkpoint saves; run_finetune reports it
__all__ = ["DiskFull", "InterruptedTraining", "TrainingStopped", "train_loop"]


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next window of rows to train on."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    history: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict) -> Position:
        """From a checkpoint's trainer_state (which also holds keys that are not position)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


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
    """SIGINT/SIGTERM: finish the current step, save, exit non-zero with the resume command.
    Every process reads the flag in the step's one all_reduce (after backward), so a signal
    that comes later in the step is acted on at the end of the next one."""

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


class InterruptedTraining(Exception):
    def __init__(self, signum: int, position: Position):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.position = position


@dataclass
class Plan:
    """How many steps, of how many micro-batches; fixed for the whole run."""

    steps_per_epoch: int
    total_steps: int
    warmup: int
    accum: int  # micro-batches per optimizer step on each process
    per_rank: int  # rows per optimizer step on each process


def _setup_plan(cfg: FinetuneConfig, n_rows: int, world: int, log) -> Plan:
    steps_per_epoch = n_rows // cfg.batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_epochs
    warmup = cfg.warmup_steps
    if warmup >= total // 2 and warmup > 0:
        warmup = max(total // 10, 1 if total > 1 else 0)
        log(f"note: --warmup_steps {cfg.warmup_steps} is too long for a {total}-step run; using {warmup}")  # fmt: skip
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    return Plan(steps_per_epoch, total, warmup, accum, cfg.micro_batch_size * accum)


def _setup_optimizer(cfg: FinetuneConfig, peft_model, plan: Plan):
    from transformers import get_scheduler

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=plan.warmup,
        num_training_steps=plan.total_steps,
    )
    return trainable, optimizer, scheduler


def _restore(resume: dict | None, peft_model, optimizer, scheduler) -> Position:
    """The checkpoint's adapter, schedule, RNG and position (before prepare(): FSDP shards
    the adapter there; the optimizer state is restored after it, in _setup_stepper)."""
    if not resume:
        return Position()
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, resume["adapter"])
    scheduler.load_state_dict(resume["scheduler"])
    ckpt.set_rng_state(resume["rng"])
    return Position.from_state(resume["trainer_state"])


def _setup_stepper(cfg, accelerator, peft_model, optimizer, scheduler, precision,
                   pad_token_id, resume) -> Stepper:  # fmt: skip
    module, optimizer = accelerator.prepare(LossModule(peft_model, cfg.loss_chunk_size), optimizer)
    if resume:  # under FSDP each rank takes its shard of the saved (whole) state
        distributed.load_optimizer_state(peft_model, optimizer, resume["optimizer"], accelerator)
    autocast = (
        (lambda: torch.autocast(accelerator.device.type, dtype=precision.autocast))
        if precision.autocast
        else contextlib.nullcontext
    )
    # One code path for every precision: disabled (not fp16) the scaler is a no-op.
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=precision.label == "fp16")
    # Clipping takes the prepared module's parameters: FSDP2 replaced them with sharded
    # ones (the pre-prepare list would have no gradients, and nothing would be clipped).
    return Stepper(accelerator, module, optimizer, scheduler, scaler, autocast,
                   list(module.parameters()), cfg.max_grad_norm, cfg.packing, pad_token_id)  # fmt: skip


def _save(cfg, s: Stepper, peft_model, pos: Position, total_steps: int, data_fp: str, log, bar):
    # Collectives first, on every rank: FSDP shards gathered, each rank's own RNG state.
    adapter = distributed.adapter_state(peft_model, s.accelerator)
    optim_state = distributed.optimizer_state(peft_model, s.optimizer, s.accelerator)
    rng = distributed.gather_rng_states(s.accelerator, ckpt.rng_state())
    if not s.accelerator.is_main_process:
        return
    state = {**asdict(pos), "total_steps": total_steps,
             "resume_fingerprint": resume_fingerprint(cfg, data_fp)}  # fmt: skip
    path = ckpt.save_checkpoint(
        Path(cfg.output_dir), pos.global_step, adapter,
        peft_model.peft_config["default"].to_dict(), optim_state,
        s.scheduler.state_dict(), rng, state, cfg.save_total_limit,
    )  # fmt: skip
    log(f"checkpoint saved: {path}", bar)


def _step_rows(cfg, rows: list[dict], window: list[int], rank: int, plan: Plan):
    """This process's micro-batches of a step, and the step's learned and total tokens over
    every process: each process holds the whole window, so counting needs no collective."""
    whole = [rows[i] for i in window]
    mine = whole[rank * plan.per_rank : (rank + 1) * plan.per_rank]
    micro = [mine[i : i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
    return micro, count_supervised(whole), sum(len(r["input_ids"]) for r in whole)


def _evaluate_logged(cfg, s, val_rows, pos, total_steps, log, bar, on_metrics) -> None:
    ev = evaluate(s, val_rows, cfg.micro_batch_size)
    pos.eval_history.append({"step": pos.global_step, "eval_loss": ev})
    log(f"step {pos.global_step}/{total_steps} | eval loss {ev:.4f}", bar)
    if on_metrics:
        on_metrics(pos.global_step, {"eval/loss": ev})


def _log_train(pos, loss, lr, rate, total_steps, log, bar, on_metrics) -> None:
    pos.history.append({"step": pos.global_step, "loss": loss, "lr": lr,
                        "tokens": pos.tokens_seen, "tok_s": rate})  # fmt: skip
    log(f"step {pos.global_step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {rate:.0f} tok/s", bar)  # fmt: skip
    if on_metrics:
        on_metrics(pos.global_step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": rate})  # fmt: skip


def _evaluate_before(cfg, s: Stepper, val_rows, pos: Position, plan: Plan, log) -> float:
    """The pre-training evaluation, on its own lines before the bar exists (on CPU it takes a
    while; inside the bar it would spoil the first rate); returns its seconds."""
    if not (val_rows and pos.global_step == 0):
        return 0.0
    log(f"evaluating on {len(val_rows):,} validation rows before training ...")
    started = time.time()
    ev = evaluate(s, val_rows, cfg.micro_batch_size)
    eval_s = time.time() - started
    pos.eval_history.append({"step": 0, "eval_loss": ev})
    log(f"step 0/{plan.total_steps} | eval loss {ev:.4f} (before training, {duration(eval_s)})")
    return eval_s


def _estimate_clock(cfg, s: Stepper, val_rows, pos: Position, plan: Plan, eval_s, log, bar):
    """A RunClock that prints the run's estimate once this process's second micro-batch of
    training is timed (a few seconds into the run, no extra compute)."""

    cuda = s.accelerator.device.type == "cuda"

    def report(micro_s: float, tokens: int) -> None:
        tok_s = tokens * s.accelerator.num_processes / max(micro_s, 1e-9)
        log(run_estimate(micro_s * plan.accum, pos.global_step, plan.total_steps, eval_s,
                         cfg.eval_steps if val_rows else 0, cuda, tok_s), bar)  # fmt: skip

    return RunClock(report, cuda)


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} CPU thread" + ("s" if n != 1 else "")


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
    log=log,  # lora_alpaca.log.log (rank-aware); the bench passes a silent one
    on_metrics=None,
) -> Position:
    """The optimizer loop. Returns the final position (with loss history)."""
    plan = _setup_plan(cfg, len(train_rows), accelerator.num_processes, log)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # the next micro-step reuses this one's memory (train/cpu_memory.py)
    trainable, optimizer, scheduler = _setup_optimizer(cfg, peft_model, plan)
    pos = _restore(resume, peft_model, optimizer, scheduler)
    s = _setup_stepper(cfg, accelerator, peft_model, optimizer, scheduler, precision, pad_token_id, resume)  # fmt: skip
    total, lengths, windows = plan.total_steps, [len(r["input_ids"]) for r in train_rows], {}
    log(f"training: {len(train_rows)} rows, {plan.steps_per_epoch} steps/epoch, {total} steps of {cfg.batch_size} rows "
        f"({cfg.micro_batch_size} x {plan.accum} accumulation x {accelerator.num_processes} process(es)), dtype "
        f"{precision.label}, packing {'on' if cfg.packing else 'off'}, {sum(p.numel() for p in trainable):,} trainable parameters"
        + (f", {_threads()}" if accelerator.device.type == "cpu" else ""))  # fmt: skip
    s.module.train()
    eval_s = _evaluate_before(cfg, s, val_rows, pos, plan, log)
    faults, sentinel = Faults(accelerator.is_main_process), Sentinel(plan.warmup, total)
    bar = step_bar(total, pos.global_step, accelerator.is_main_process)
    s.clock = _estimate_clock(cfg, s, val_rows, pos, plan, eval_s, log, bar)
    t0, tokens_at_start = time.time(), pos.tokens_seen  # rates are timed from the first step
    with StopFlag() as stop:
        while pos.global_step < total:
            if pos.epoch not in windows:
                windows = {pos.epoch: epoch_windows(len(train_rows), lengths, cfg, pos.epoch)}
            if pos.step_in_epoch >= len(windows[pos.epoch]):
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                continue
            window = windows[pos.epoch][pos.step_in_epoch]
            micro, n_sup, n_tok = _step_rows(
                cfg, train_rows, window, accelerator.process_index, plan
            )
            loss, lr, stop_now = train_step(s, micro, n_sup, pos.global_step + 1, pos.epoch, window,
                                            faults, stop, sentinel)  # fmt: skip
            pos.global_step, pos.step_in_epoch = pos.global_step + 1, pos.step_in_epoch + 1
            pos.tokens_seen += n_tok
            rate = (pos.tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
            if pos.global_step % cfg.logging_steps == 0 or pos.global_step == total:
                _log_train(pos, loss, lr, rate, total, log, bar, on_metrics)
            if val_rows and (pos.global_step % cfg.eval_steps == 0 or pos.global_step == total):
                _evaluate_logged(cfg, s, val_rows, pos, total, log, bar, on_metrics)
            if (cfg.save_steps and pos.global_step % cfg.save_steps == 0) or stop_now:
                _save(cfg, s, peft_model, pos, total, data_fp, log, bar)
            if stop_now:
                bar.close()
                raise InterruptedTraining(stop.signum or signal.SIGTERM, pos)
    bar.close()
    if val_rows and not pos.eval_history:
        pos.eval_history.append({"step": pos.global_step, "eval_loss": evaluate(s, val_rows, cfg.micro_batch_size)})  # fmt: skip
    pos.wall_time_s = time.time() - t0
    pos.tokens_this_run = pos.tokens_seen - tokens_at_start
    return pos
