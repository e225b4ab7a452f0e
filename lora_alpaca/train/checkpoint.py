"""Resumable checkpoints that are either complete or absent.

A checkpoint is written into `checkpoints/.tmp-checkpoint-N`, every file fsynced, a
`COMPLETE` marker written last, and the folder renamed to `checkpoints/checkpoint-N`
(rename is atomic on POSIX). A crash mid-write leaves only a `.tmp-*` folder, which
`find_latest` ignores and the next save removes. Nothing here unpickles arbitrary
objects: tensors go through safetensors or `torch.load(weights_only=True)`.

Why not Trainer/accelerate `save_state`: they write in place (a kill mid-write leaves a
folder that looks complete) and store RNG state with pickle.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_alpaca.errors import UsageError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE = "COMPLETE"


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    adapter_config: dict,
    optimizer_state: dict,
    scheduler_state: dict,
    rng_state: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    trainer_state: dict,
    keep: int,
) -> Path:
    """Rank 0 only. `rng_state`: one dict per rank (or one dict for a single process)."""
    rng_states = [rng_state] if isinstance(rng_state, dict) else list(rng_state)
    # Resuming needs the same number of processes: each rank restores its own RNG stream.
    trainer_state = {**trainer_state, "world_size": len(rng_states)}
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-checkpoint-{step:08d}"
    try:
        _write_checkpoint_files(
            tmp,
            adapter_state,
            adapter_config,
            optimizer_state,
            scheduler_state,
            rng_states,
            trainer_state,
        )
    except Exception as e:  # noqa: BLE001 - torch/safetensors report a full disk in many types
        shutil.rmtree(tmp, ignore_errors=True)  # the last good checkpoint stays untouched
        free = shutil.disk_usage(root).free
        if _is_disk_full(e, free):
            raise DiskFull(
                f"disk full while writing checkpoint {step} to {root} "
                f"({free / 2**20:.1f} MB free on that disk)"
            ) from e
        raise
    final = root / f"checkpoint-{step:08d}"
    if final.exists():  # a rerun of the same step after a resume: replace it atomically
        old = root / f".tmp-old-{step:08d}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    prune(root, keep)
    return final


class DiskFull(Exception):
    """No room for a checkpoint: the run stops, keeping its last good checkpoint."""


def _is_disk_full(e: BaseException, free: int) -> bool:
    # torch.save says "file write failed" (inline_container.cc), safetensors an I/O error.
    text = str(e).lower()
    return (
        (isinstance(e, OSError) and e.errno == errno.ENOSPC)
        or "no space left" in text
        or "write failed" in text
        or free < 1024 * 1024
    )


def _write_checkpoint_files(
    tmp: Path,
    adapter_state,
    adapter_config,
    optimizer_state,
    scheduler_state,
    rng_states,
    trainer_state,
) -> None:
    tmp.mkdir()
    # The adapter in PEFT's own layout, so a checkpoint can also be used directly.
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in adapter_state.items()},
        str(tmp / "adapter_model.safetensors"),
    )
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, default=str))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / rng_file(rank)))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=str))
    _fsync_tree(tmp)
    # Fault-injection hook (tests/test_fault_injection.py): hold the folder in its most
    # deceptive state, every file written but no marker, so a test can kill it right there.
    time.sleep(float(os.environ.get("LORA_ALPACA_FAULT_SLOW_SAVE") or 0))
    (tmp / COMPLETE).write_text("ok\n")
    with open(tmp / COMPLETE, "rb") as fh:
        os.fsync(fh.fileno())


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def find_latest(output_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = sorted(
        (p for p in root.iterdir() if CKPT_RE.match(p.name)),
        key=lambda p: int(CKPT_RE.match(p.name).group(1)),
    )
    for old in ckpts[:-keep]:
        # Remove the marker first: a crash mid-delete must not leave a "complete" husk.
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.safetensors"


def load_checkpoint(path: Path, rank: int = 0) -> dict:
    """Everything a resume needs; `rng` is this rank's own RNG state (None when the
    checkpoint has none for this rank: it was written by fewer processes)."""
    path = Path(path)
    rng_path = path / rng_file(rank)
    if not rng_path.is_file():
        # Checkpoints from before per-rank RNG files held rank 0's state only.
        rng_path = path / "rng_state.safetensors" if rank == 0 else rng_path

    def plain(name: str):
        try:
            return torch.load(path / name, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            # weights_only refused a non-tensor object: the file was not written by us.
            raise UsageError(
                f"--resume_from_checkpoint {path}: {name} holds objects other than tensors "
                "(refused: unpickling them could run code); resume from another checkpoint"
            ) from None

    return {
        "adapter": load_file(str(path / "adapter_model.safetensors")),
        "optimizer": plain("optimizer.pt"),
        "scheduler": plain("scheduler.pt"),
        "rng": load_file(str(rng_path)) if rng_path.is_file() else None,
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch (+ CUDA), numpy and Python RNG states, as tensors (safetensors
    stores them without pickle)."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            state[f"cuda{i}"] = torch.cuda.get_rng_state(i)
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64)
    version, internal, py_gauss = random.getstate()
    state["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    nan = float("nan")
    state["gauss"] = torch.tensor(
        [gauss, nan if py_gauss is None else py_gauss], dtype=torch.float64
    )
    return state


def set_rng_state(state: dict[str, torch.Tensor] | None) -> None:
    if state is None:  # no state saved for this rank (see load_checkpoint)
        return
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    for key, value in state.items():
        if key.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(key[4:]))
    if "numpy" in state:  # older checkpoints saved torch's state only
        np_gauss, py_gauss = state["gauss"].tolist()
        *keys, pos, has_gauss = state["numpy"].tolist()
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, np_gauss))
        version, *internal = state["python"].tolist()
        random.setstate((version, tuple(internal), None if py_gauss != py_gauss else py_gauss))
