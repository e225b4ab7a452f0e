"""Two real processes over gloo on CPU, launched as the README launches them: FSDP2 with
`accelerate launch --config_file configs/fsdp2.yaml`, DDP with torchrun.

- FSDP2 gives the adapter of one process with the same effective batch (dropout off), and
  that adapter is a plain PEFT one (loads on one device);
- an FSDP2 run SIGKILLed while rank 0 writes a checkpoint (every file, no marker yet) leaves
  that checkpoint torn and ignored, and resumed (through torchrun --fsdp, the shortcut)
  equals the uninterrupted FSDP2 run;
- DDP with dropout on, SIGKILLed and resumed, equals the uninterrupted DDP run: every rank
  restores its own RNG state (the ranks' states differ, so one state restored everywhere
  would not do);
- a resume with another number of processes is refused.

A kill takes the whole job at once (the launcher and every rank, as a lost machine would); the row log (rank 0, one line per step) says where training is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from api_server import free_port
from conftest import ROOT
from safetensors.torch import load_file
from test_finetune import write_rows

from lora_alpaca.train import checkpoint as ckpt

STEPS = 6  # 40 training rows, 5 steps of 8 per epoch: the run crosses an epoch
FLAGS = (
    "--batch_size 8 --micro_batch_size 2 --num_epochs 2 --max_steps 6 --val_set_size 8 "
    "--eval_steps 100 --cutoff_len 96 --lora_r 4 --learning_rate 1e-2 --warmup_steps 0 "
    "--logging_steps 1 --save_steps 1 --dtype fp32 --seed 5 --resume_from_checkpoint auto"
).split()
ACCELERATE = Path(sys.executable).parent / "accelerate"


def command(kind: str, base: Path, data: Path, out: Path, dropout: str) -> list[str]:
    script = [str(ROOT / "finetune.py"), "--base_model", str(base), "--data", str(data),
              "--output_dir", str(out), *FLAGS, "--lora_dropout", dropout]  # fmt: skip
    port = str(free_port())
    if kind == "fsdp":
        return [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "fsdp2.yaml"),
                "--num_processes", "2", "--main_process_port", port, *script]  # fmt: skip
    if kind in ("ddp", "torchrun --fsdp"):
        fsdp = ["--fsdp"] if kind != "ddp" else []
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", port, *script, *fsdp]  # fmt: skip
    return [sys.executable, *script]


def start(cmd: list[str], tmp: Path, name: str, **extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "LORA_ALPACA_CACHE": str(tmp / "cache"), **extra}  # fmt: skip
    with open(tmp / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)


def run(cmd: list[str], tmp: Path, name: str, **extra: str) -> str:
    proc = start(cmd, tmp, name, **extra)
    rc = proc.wait(timeout=600)
    err = (tmp / f"{name}.err").read_text(errors="replace")
    assert rc == 0, err[-4000:]
    return err


def kill_job(proc: subprocess.Popen, cond, tmp: Path, name: str) -> None:
    end = time.time() + 300
    while not cond():
        err = (tmp / f"{name}.err").read_text(errors="replace")
        assert proc.poll() is None, f"{name} exited early:\n{err[-3000:]}"
        assert time.time() < end, f"{name}: timed out\n{err[-3000:]}"
        time.sleep(0.01)
    # torchrun puts each rank in a session of its own: kill the launcher's whole tree, all
    # at once (the ranks first, so none sees its peer go and reacts).
    tree = descendants(proc.pid)
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in tree:  # gone: a rank still alive would go on writing
        end = time.time() + 30
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z" and time.time() < end:
            time.sleep(0.01)
        assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z", pid


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def descendants(root: int) -> list[int]:
    """Every process below `root` (Linux /proc: ppid is the 2nd field after the name)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                pass
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def progress(row_log: Path) -> int:
    if not row_log.is_file():
        return 0
    lines = row_log.read_text().split("\n")[:-1]  # the last piece may be mid-write
    return max((json.loads(ln)["step"] for ln in lines if ln), default=0)


def assert_same(a: Path, b: Path, rtol: float, atol: float) -> None:
    x, y = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("dist-data") / "rows.json")


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory, tiny_model, rows) -> Path:
    """The uninterrupted FSDP2 run, dropout off."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    cmd = command("fsdp", tiny_model, rows, tmp / "run", "0") + ["--save_total_limit", "0"]
    err = run(cmd, tmp, "fsdp")  # every checkpoint kept, to compare against
    assert "FSDP2: sharding each LlamaDecoderLayer" in err, err[-3000:]
    return tmp / "run"


def test_fsdp2_equals_one_process_and_writes_a_plain_peft_adapter(
    fsdp_reference, tiny_model, rows, tmp_path
):
    info = json.loads((fsdp_reference / "run.json").read_text())
    assert (info["world_size"], info["sharding"], info["steps"]) == (2, "fsdp2", STEPS)
    run(command("single", tiny_model, rows, tmp_path / "single", "0"), tmp_path, "single")
    assert_same(tmp_path / "single", fsdp_reference, rtol=1e-4, atol=1e-5)
    # The final adapter and each checkpoint's are whole tensors in PEFT's layout.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), fsdp_reference
    )
    saved = load_file(str(fsdp_reference / "adapter_model.safetensors"))
    lora_a = next(k for k in saved if "q_proj.lora_A" in k)
    assert saved[lora_a].shape == (4, 64)  # r x hidden, not a shard of it
    assert sum(int(v.abs().sum() > 0) for k, v in saved.items() if "lora_B" in k) > 0
    assert model.peft_config["default"].r == 4
    last = ckpt.load_checkpoint(ckpt.find_latest(fsdp_reference), rank=1)
    assert last["trainer_state"]["world_size"] == 2 and last["rng"] is not None
    assert last["optimizer"]["state"]  # AdamW moments, gathered whole


def test_fsdp2_killed_mid_save_then_resumed_equals_uninterrupted(
    fsdp_reference, tiny_model, rows, tmp_path
):
    out, row_log = tmp_path / "run", tmp_path / "rows.log"
    cmd = command("fsdp", tiny_model, rows, out, "0")

    def torn() -> bool:  # rank 0 has written every file of checkpoint >= 3, not its marker
        return any((d / "trainer_state.json").is_file() and not (d / ckpt.COMPLETE).exists()
                   and int(d.name.rsplit("-", 1)[1]) >= 3
                   for d in ckpt.checkpoints_dir(out).glob(".tmp-checkpoint-*"))  # fmt: skip

    proc = start(cmd, tmp_path, "killed", LORA_ALPACA_FAULT_SLOW_SAVE="0.5",
                 LORA_ALPACA_ROW_LOG=str(row_log))  # fmt: skip
    kill_job(proc, torn, tmp_path, "killed")
    torn_step = int(sorted(ckpt.checkpoints_dir(out).glob(".tmp-checkpoint-*"))[-1].name[-8:])
    complete = ckpt.complete_checkpoints(out)
    assert complete and int(complete[-1].name[-8:]) == torn_step - 1  # the torn one is ignored
    assert not (out / "lora_alpaca.json").exists()
    for path in complete:
        ref = fsdp_reference / "checkpoints" / path.name
        assert_same(ref, path, rtol=1e-5, atol=1e-6)
    # Resumed through the --fsdp shortcut of torchrun: the same FSDP2 setup as the config file.
    resume = command("torchrun --fsdp", tiny_model, rows, out, "0")
    err = run(resume, tmp_path, "resumed", LORA_ALPACA_ROW_LOG=str(row_log))
    assert f"resuming from {complete[-1]}" in err and "FSDP2: sharding each" in err, err[-3000:]
    assert progress(row_log) == STEPS
    assert json.loads((out / "run.json").read_text())["sharding"] == "fsdp2"
    assert_same(fsdp_reference, out, rtol=1e-5, atol=1e-6)
    assert not list(ckpt.checkpoints_dir(out).glob(".tmp-*"))


def test_ddp_with_dropout_killed_then_resumed_equals_uninterrupted(tiny_model, rows, tmp_path):
    ref = tmp_path / "ref"
    run(command("ddp", tiny_model, rows, ref, "0.1"), tmp_path, "ref")
    last = ckpt.find_latest(ref)
    rng0, rng1 = (load_file(str(last / ckpt.rng_file(r))) for r in (0, 1))
    assert not torch.equal(rng0["torch"], rng1["torch"])  # each rank's dropout is its own

    out, row_log = tmp_path / "run", tmp_path / "rows.log"
    cmd = command("ddp", tiny_model, rows, out, "0.1")
    proc = start(cmd, tmp_path, "killed", LORA_ALPACA_ROW_LOG=str(row_log))
    kill_job(proc, lambda: progress(row_log) >= 3, tmp_path, "killed")
    latest = ckpt.find_latest(out)
    assert latest is not None and not (out / "lora_alpaca.json").exists()
    assert int(latest.name[-8:]) < STEPS
    err = run(cmd, tmp_path, "resumed", LORA_ALPACA_ROW_LOG=str(row_log))
    assert f"resuming from {latest}" in err, err[-3000:]
    assert_same(ref, out, rtol=1e-5, atol=1e-6)

    # One process cannot take over two processes' RNG streams: refused, one line, exit 2.
    single = command("single", tiny_model, rows, out, "0.1")
    single[single.index("auto")] = str(ckpt.find_latest(out))
    r = subprocess.run(single, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LORA_ALPACA_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "written by 2 process(es), this run has 1" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
