"""One run per output folder, and --overwrite_output_dir that only removes our own runs.

The lock is `fcntl.flock` on `<output_dir>/.lora_alpaca.lock`: the kernel drops it when
the holder dies (even by SIGKILL), so a lock file left by a dead process is stale by
construction and the next run takes it over. The file records the holder's pid and host
so a refused second run can name it. Why not a pid file alone: a pid can be reused, and
two runs starting at once would both see "no pid file".
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import expand_user, inside

LOCK_NAME = ".lora_alpaca.lock"

# What finetune.py writes into --output_dir (adapter, tokenizer, reports, checkpoints).
RUN_FOLDER_ENTRIES = {
    LOCK_NAME,
    "lora_alpaca.json",
    "run.json",
    "loss_curve.png",
    "README.md",
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "checkpoints",
    "tensorboard",
    "wandb",
}


class RunLock:
    """Exclusive lock on a run folder; `release()` (or process exit) frees it."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> RunLock:
        if not self.output_dir.exists():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UsageError(
                    f"--output_dir {self.output_dir}: another run is using it ({holder}); "
                    "wait for it to finish or choose another folder"
                ) from None
            # The holder may have unlinked the file between our open and flock: then we
            # locked an orphan inode; retry on the path's current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def release(self, remove_dir_if_empty: bool = False) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if remove_dir_if_empty and self.created_dir:
            try:
                self.output_dir.rmdir()
            except OSError:
                pass


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"held by pid {info.get('pid')} on {info.get('host')}"
    except (OSError, ValueError):
        return "held by another process"


def lock_holder(output_dir: Path) -> str | None:
    """'held by pid N on host' if a live process holds the folder's lock, else None."""
    path = Path(output_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None  # stale: its holder is gone


def is_empty_run_folder(output_dir: Path) -> bool:
    d = Path(output_dir)
    return not d.is_dir() or all(p.name == LOCK_NAME for p in d.iterdir())


def overwrite_problem(output_dir: Path, protected: dict[str, str | None]) -> str | None:
    """Why --overwrite_output_dir must not delete this folder, or None when it is a
    lora-alpaca run folder holding nothing else and none of the run's inputs."""
    d = Path(output_dir).resolve()
    if not d.exists():
        return None
    flag = f"--overwrite_output_dir: refusing to delete {d}"
    if not d.is_dir():
        return f"{flag}: it is not a folder"
    home = Path.home().resolve()
    if d == Path(d.anchor) or inside(home, d) or inside(Path.cwd(), d):
        return (
            f"{flag}: it is (or holds) your home folder, the current folder or the file system root"
        )
    for name, value in protected.items():
        if value and expand_user(value).exists() and inside(expand_user(value), d):
            return f"{flag}: it holds {name} {value}"
    entries = list(d.iterdir())
    ours = {
        p.name for p in entries if p.name in RUN_FOLDER_ENTRIES or p.name.startswith(".tmp-final-")
    }
    foreign = sorted(p.name for p in entries if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        return f"{flag}: it holds files lora-alpaca did not write ({shown}); remove them yourself or choose another folder"
    if entries and not ({"lora_alpaca.json", "checkpoints", "adapter_model.safetensors"} & ours):
        return f"{flag}: it is not a lora-alpaca run folder"
    return None


def remove_run_folder_contents(output_dir: Path) -> None:
    """Delete what a previous run wrote, leaving the folder (and our lock) in place."""
    for p in Path(output_dir).iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
