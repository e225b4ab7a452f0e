"""Figures and progress lines written for people: durations as "2 min 30 s", losses with
four significant digits, rates without decimals; one line per stage that takes a while."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from lora_alpaca.log import log


def duration(seconds: float) -> str:
    """42 s, 2 min 30 s, 3 h 05 min."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def seconds(value: float) -> str:
    """A stage's wall time: tenths under 10 s (0.4 s, not "0 s"), else `duration`."""
    return f"{value:.1f} s" if value < 10 else duration(value)


def loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def human_summary(
    train_loss: float | None, eval_loss: float | None, tok_s: float, wall_s: float | None
) -> str:
    parts = [f"train loss {loss(train_loss)}"]
    if eval_loss is not None:
        parts.append(f"held-out loss {loss(eval_loss)}")
    parts.append(f"{tok_s:,.0f} tokens/s")
    if wall_s is not None:
        parts.append(f"{duration(wall_s)} in all")
    return ", ".join(parts)


def run_estimate(
    step_s: float,
    step: int,
    total_steps: int,
    eval_s: float,
    eval_steps: int,
    on_gpu: bool,
    tok_s: float = 0.0,
) -> str:
    """The rest of the run's expected length, printed a few seconds into training: from a
    timed micro-batch of it (`step_s` per optimizer step, `tok_s` tokens/s) and the timed
    evaluation (evaluations every `eval_steps` and at the end), with what would change it.
    `step`: optimizer steps finished."""
    steps_left = total_steps - step
    evals_left = 0
    if eval_steps and eval_s:  # eval_steps 0: no validation rows, so no evaluations
        evals = {total_steps} | {k for k in range(step + 1, total_steps + 1) if k % eval_steps == 0}
        evals_left = len(evals)
    total = step_s * steps_left + eval_s * evals_left
    line = f"estimate: {duration(total)} for the remaining {steps_left} step(s) at {duration(step_s)}/step"
    if tok_s:
        line += f" (~{tok_s:,.0f} tokens/s)"
    if evals_left:
        line += f" + {evals_left} evaluation(s) of ~{duration(eval_s)}"
    line += "; --max_steps N caps the steps"
    if not on_gpu:
        line += ", a CUDA GPU runs the same steps far faster"
    return line


def bar_enabled() -> bool:
    """tqdm redraws with carriage returns: live on a terminal, a wall of fragments in a
    log file, so logs get the periodic `step N/M` lines instead."""
    return sys.stderr.isatty()


def step_bar(total_steps: int, initial: int, main_process: bool):
    """The training bar: live on a terminal (main process only), off in a log."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total_steps,
        initial=initial,
        disable=not (main_process and bar_enabled()),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


@contextmanager
def stage(
    start: str | None, done: str = "done", *, rate: tuple[int, str] | None = None, tag: str = ""
):
    """A stage that may take a while: `start ...` before it (None: no opening line, for a
    stage that is quick on small inputs), `done in X s` after it succeeds (with
    `rate=(count, unit)`: `(N unit/s)` too); one plain line each, so a log file stays clean
    when stderr is not a terminal; rank 0 only (lora_alpaca.log). A failing stage prints
    no closing line: its error is the line that matters."""
    if start is not None:
        log(f"{start} ...", tag=tag)
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    line = f"{done} in {seconds(took)}"
    if rate is not None:
        line += f" ({rate[0] / max(took, 1e-6):,.0f} {rate[1]}/s)"
    log(line, tag=tag)
