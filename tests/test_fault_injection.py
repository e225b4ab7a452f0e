"""Fault injection: a real finetune.py run on a tiny model, killed again and again, resumed
each time with `--resume_from_checkpoint auto`, must end exactly where an uninterrupted run
ends, and must never leave a checkpoint that looks complete but is not.

One run is taken through, in order: SIGKILL at a random moment, SIGKILL while a checkpoint
is being written (every file on disk, marker not yet), SIGKILL at a random moment again,
SIGINT and SIGTERM at random moments (clean save: exit 130 / 143, checkpoint of the last
step), a NaN injected into the loss (exit 3, diagnosis, last good checkpoint intact), a
SIGKILL while the final adapter folder is being written, and a last resume to the end.
After every stage:
  (a) every folder that looks like a complete checkpoint loads, and its adapter equals the
      uninterrupted run's checkpoint of the same step;
and at the end:
  (b) the final adapter equals the uninterrupted run's (rtol 1e-5, atol 1e-6);
  (c) no row is trained on twice or skipped within an epoch across the restarts: keeping
      the last row-log entry per step, every epoch holds exactly the rows of
      `epoch_windows(...)`, each once, and every step matches the uninterrupted run's.

The kill moments are random (seed printed on failure); they are anchored to training
progress read from the row log, so a kill never lands before training starts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from lora_alpaca.train import checkpoint as ckpt
from lora_alpaca.train.config import FinetuneConfig
from lora_alpaca.train.loop import epoch_windows

N_ROWS, BATCH, EPOCHS, SEED = 42, 4, 3, 11  # 10 steps per epoch (2 rows left over), 30 steps
STEPS = (N_ROWS // BATCH) * EPOCHS
WORDS = ["apple", "river", "stone", "cloud", "violet", "candle", "harbor", "meadow"]


def write_rows(path: Path) -> Path:
    rows = [
        {"instruction": f"Say the number {i} and the word {WORDS[i % 8]}.", "input": "",
         "output": f"{i} {WORDS[i % 8]} " * (1 + i % 3)}
        for i in range(N_ROWS)
    ]  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def argv(base: Path, data: Path, out: Path, keep: int) -> list[str]:
    # dropout on: the resumed run must also restore the RNG state exactly.
    return [
        sys.executable, str(ROOT / "finetune.py"), "--base_model", str(base), "--data", str(data),
        "--output_dir", str(out), "--batch_size", str(BATCH), "--micro_batch_size", "2",
        "--num_epochs", str(EPOCHS), "--val_set_size", "0", "--cutoff_len", "64", "--lora_r", "4",
        "--lora_dropout", "0.1", "--learning_rate", "1e-2", "--warmup_steps", "0", "--seed", str(SEED),
        "--logging_steps", "1", "--save_steps", "1", "--save_total_limit", str(keep), "--dtype", "fp32",
        "--resume_from_checkpoint", "auto",
    ]  # fmt: skip


def env(tmp: Path, row_log: Path, **extra: str) -> dict:
    return {
        **os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        "LORA_ALPACA_CACHE": str(tmp / "cache"), "LORA_ALPACA_ROW_LOG": str(row_log), **extra,
    }  # fmt: skip


def logged_steps(row_log: Path) -> list[dict]:
    if not row_log.is_file():
        return []
    lines = row_log.read_text().split("\n")
    return [json.loads(ln) for ln in lines[:-1] if ln]  # the last piece may be mid-write


def last_entry_per_step(row_log: Path) -> dict[int, dict]:
    """Steps after the last checkpoint are redone after a kill: the last entry counts."""
    return {e["step"]: e for e in logged_steps(row_log)}


class Stage:
    """One process of the interrupted run, with its own stdout/stderr files."""

    def __init__(self, cmd: list[str], env: dict, logs: Path, name: str):
        self.name = name
        self.err_path = logs / f"{name}.err"
        with open(logs / f"{name}.out", "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_until(self, cond, timeout: float = 240.0) -> None:
        end = time.time() + timeout
        while not cond():
            assert self.proc.poll() is None, f"{self.name} exited early:\n{self.stderr()[-3000:]}"
            assert time.time() < end, f"{self.name}: timed out\n{self.stderr()[-3000:]}"
            time.sleep(0.005)

    def finish(self, timeout: float = 300.0) -> int:
        return self.proc.wait(timeout=timeout)


def check_checkpoints(out: Path, ref_out: Path, where: str) -> list[int]:
    """(a): every complete-looking checkpoint loads and equals the reference at its step."""
    steps = []
    for path in ckpt.complete_checkpoints(out):
        step = int(ckpt.CKPT_RE.match(path.name).group(1))
        state = ckpt.load_checkpoint(path)  # safetensors + torch.load(weights_only=True)
        assert state["trainer_state"]["global_step"] == step, (where, path)
        assert state["optimizer"]["state"], (where, path)  # AdamW moments are there
        ref = load_file(str(ref_out / "checkpoints" / path.name / "adapter_model.safetensors"))
        assert state["adapter"].keys() == ref.keys(), (where, path)
        for k in ref:
            torch.testing.assert_close(
                state["adapter"][k],
                ref[k],
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, k=k, p=path: f"{where} {p.name} {k}: {m}",
            )
        steps.append(step)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The uninterrupted run, keeping every checkpoint to compare against."""
    tmp = tmp_path_factory.mktemp("fault-ref")
    data = write_rows(tmp / "rows.json")
    out, row_log = tmp / "run", tmp / "rows.log"
    r = subprocess.run(argv(tiny_model, data, out, keep=0), env=env(tmp, row_log),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(ckpt.complete_checkpoints(out)) == STEPS
    return {"data": data, "out": out, "row_log": row_log, "cache": tmp / "cache"}


def test_kills_signals_and_nan_then_resume_equal_the_uninterrupted_run(
    tiny_model, reference, tmp_path
):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    tag = f"(random seed {seed})"
    out, row_log, logs = tmp_path / "run", tmp_path / "rows.log", tmp_path / "logs"
    logs.mkdir()
    cmd = argv(tiny_model, reference["data"], out, keep=2)  # keep=2: pruning runs under fire too

    def progress() -> int:
        return max((e["step"] for e in logged_steps(row_log)), default=0)

    def start(name: str, **extra: str) -> Stage:
        return Stage(cmd, env(tmp_path, row_log, **extra), logs, name)

    def kill_after_progress(stage: Stage, sig: int) -> None:
        """Random moment: 1-3 steps past where this stage began, plus 0-60 ms."""
        target = progress() + rng.randint(1, 3)
        stage.wait_until(lambda: progress() >= target)
        time.sleep(rng.uniform(0, 0.06))
        stage.proc.send_signal(sig)

    # 1. SIGKILL at a random moment.
    s = start("kill1")
    kill_after_progress(s, signal.SIGKILL)
    assert s.finish() == -signal.SIGKILL, tag
    assert not (out / "lora_alpaca.json").exists()  # never mistaken for a finished run
    check_checkpoints(out, reference["out"], f"after kill1 {tag}")

    # 2. SIGKILL while a checkpoint is being written: all its files, no COMPLETE marker yet.
    s = start("kill-mid-save", LORA_ALPACA_FAULT_SLOW_SAVE="0.4")
    begun = progress()

    def torn_checkpoint() -> bool:
        return any((d / "trainer_state.json").is_file() and not (d / ckpt.COMPLETE).exists()
                   for d in ckpt.checkpoints_dir(out).glob(".tmp-checkpoint-*")
                   if int(d.name.rsplit("-", 1)[1]) > begun)  # fmt: skip

    s.wait_until(torn_checkpoint)
    s.proc.send_signal(signal.SIGKILL)
    assert s.finish() == -signal.SIGKILL, tag
    torn = sorted(ckpt.checkpoints_dir(out).glob(".tmp-checkpoint-*"))
    assert torn, "the kill should have left a torn checkpoint folder behind"
    torn_step = int(torn[-1].name.rsplit("-", 1)[1])
    latest = check_checkpoints(out, reference["out"], f"after kill-mid-save {tag}")
    assert latest and latest[-1] == torn_step - 1, (latest, torn_step, tag)  # torn one ignored

    # 3. SIGKILL at a random moment again (the torn folder is cleaned by the next save).
    s = start("kill2")
    kill_after_progress(s, signal.SIGKILL)
    assert s.finish() == -signal.SIGKILL, tag
    check_checkpoints(out, reference["out"], f"after kill2 {tag}")

    # 4./5. SIGINT, then SIGTERM: finish the step, save it, exit 128 + signal, say how to resume.
    for sig in (signal.SIGINT, signal.SIGTERM):
        s = start(sig.name)
        kill_after_progress(s, sig)
        assert s.finish() == 128 + sig, (sig.name, s.stderr()[-3000:], tag)
        err = s.stderr()
        assert "resume with:" in err and "--resume_from_checkpoint auto" in err, err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        steps = check_checkpoints(out, reference["out"], f"after {sig.name} {tag}")
        assert steps[-1] == progress(), (sig.name, steps, progress(), tag)  # nothing lost
        assert not list(ckpt.checkpoints_dir(out).glob(".tmp-*")), sig.name  # clean save

    # 6. NaN in the loss: stop with a diagnosis, keep the last good checkpoint intact.
    good = progress()
    s = start("nan", LORA_ALPACA_FAULT_NAN_STEP=str(good + 2))
    assert s.finish() == 3, s.stderr()[-3000:]
    err = s.stderr()
    assert f"loss is nan at step {good + 2}" in err and "last good checkpoint is kept" in err, err[
        -2000:
    ]
    assert f"checkpoint-{good + 1:08d}" in err and "Traceback" not in err, err[-2000:]
    steps = check_checkpoints(out, reference["out"], f"after nan {tag}")
    assert steps[-1] == good + 1 == progress(), (steps, good, tag)

    # 7. Resume to the end, and SIGKILL it while it writes the final adapter folder.
    s = start("kill-final-write")
    s.wait_until(lambda: any(out.glob(".tmp-final-*")))
    s.proc.send_signal(signal.SIGKILL)
    assert s.finish() == -signal.SIGKILL, tag
    assert progress() == STEPS and not (out / "lora_alpaca.json").exists()  # not "finished"

    # 8. Resume once more: nothing left to train, the final folder is written whole.
    s = start("final")
    assert s.finish() == 0, s.stderr()[-3000:]
    assert progress() == STEPS

    # (b) the final adapter equals the uninterrupted run's.
    a = load_file(str(reference["out"] / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "run.json").read_text())["steps"] == STEPS
    assert not list(ckpt.checkpoints_dir(out).glob(".tmp-*"))  # torn folders cleaned up
    assert not list(out.glob(".tmp-*")) and (out / "lora_alpaca.json").is_file()
    assert len(ckpt.complete_checkpoints(out)) == 2  # --save_total_limit held throughout

    # (c) every row once per epoch, exactly the planned windows, across all restarts.
    got, want = last_entry_per_step(row_log), last_entry_per_step(reference["row_log"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert len(logged_steps(row_log)) > STEPS  # some steps really were redone after kills
    cfg = FinetuneConfig(batch_size=BATCH, seed=SEED)
    per_epoch = N_ROWS // BATCH
    for epoch in range(EPOCHS):
        windows = epoch_windows(N_ROWS, [], cfg, epoch)
        steps = range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
        rows = [i for s_ in steps for i in got[s_]["rows"]]
        assert all(got[s_]["epoch"] == epoch for s_ in steps)
        assert len(rows) == len(set(rows)) == per_epoch * BATCH, epoch  # none twice
        assert [got[s_]["rows"] for s_ in steps] == windows  # none skipped, planned order
    assert got == want
