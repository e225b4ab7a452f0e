"""The one set of atomic writes: every file and folder the toolkit produces goes through here.

A file is written to a temp file beside it, fsynced and renamed over the target; a folder is
filled inside a private temp folder beside its destination and renamed into place. A crash
therefore never leaves a half-written file or folder where a finished one is expected.

Below them, the checks every command runs on the paths it will write, before any slow work
starts. The user's files are sacred: an output path that is one of the inputs, an existing file
(without the explicit overwrite flag), or something other than a regular file (a symlink,
a device node) is refused. A folder that cannot be created or written (read-only file
system, /proc, a parent that is a file) or a disk without room is found here, not at the
first save hours later. Every problem is one UsageError line naming the flag.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_alpaca.errors import UsageError


def expand_user(path) -> Path:
    """`~` / `~user` expanded where it can be; a name like `~..` (no such user) stays as
    typed instead of raising RuntimeError out of pathlib, and so does `~` followed by a NUL
    byte (the user lookup raises ValueError), which the caller's checks then refuse."""
    try:
        return Path(path).expanduser()
    except (RuntimeError, ValueError):
        return Path(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file + fsync + rename: a crash never leaves a half-written file."""
    path = Path(path)
    refuse_non_regular_target(path)  # rename would replace a symlink or device node
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent.resolve())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def temp_dir_beside(target: Path, prefix: str | None = None) -> Path:
    """A private, empty folder on the same filesystem as `target` (so a rename can publish it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))


def rename_into_place(tmp: Path, target: Path) -> bool:
    """Publish a finished temp folder in one rename. False when another process published the
    same target first (its copy is as good as ours, so ours is discarded)."""
    try:
        Path(tmp).rename(target)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


# Flags whose value is a path (or a hub id, which has no component this long either).
PATH_FLAGS = (
    "data",
    "output_dir",
    "base_model",
    "lora_weights",
    "input_file",
    "output_file",
    "probe_report",
    "prompt_template_name",
    "resume_from_checkpoint",
    "init_from_adapter",
    "parity_prompts_file",
)


def name_max(path: str) -> int:
    """Longest file name the file system takes (255 bytes almost everywhere)."""
    probe = expand_user(path)
    while not os.path.lexists(probe) and probe != probe.parent:  # lexists: no ENAMETOOLONG
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_name_lengths(values: dict[str, object]) -> None:
    """ENAMETOOLONG found up front, for every path flag, with the flag named."""
    for flag, value in values.items():
        if flag not in PATH_FLAGS or not isinstance(value, str) or not value:
            continue
        limit = name_max(value)
        for part in expand_user(value).parts:
            if len(os.fsencode(part)) > limit:
                raise UsageError(
                    f"--{flag}: the path component {part[:40]}... is {len(os.fsencode(part))} bytes; "
                    f"file names may be at most {limit} bytes"
                )


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p == p.parent:
            break
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_writable_dir(
    flag: str,
    folder: Path,
    need_bytes: int = 0,
    need_what: str = "a checkpoint and the final adapter",
) -> None:
    """The folder exists or can be created, a file can be written in it, and the disk
    has `need_bytes` free (for `need_what`, named in the error). Writes nothing."""
    folder = expand_user(folder).absolute()
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UsageError(f"{flag} {folder}: {base} is a file, not a folder")
    if str(folder).startswith("/proc/") or str(folder).startswith("/sys/"):
        raise UsageError(f"{flag} {folder}: {base} is a kernel file system; choose a real folder")
    # Asked of the kernel, not probed with a temp file: a probe would change the folder's
    # mtime, and a refused run must leave the disk exactly as it was.
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        raise UsageError(f"{flag} {folder}: cannot write in {base} (read-only file system)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: cannot write in {base} (permission denied)")
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise UsageError(
                f"{flag} {folder}: only {_human(free)} free on the disk holding {base}; "
                f"this run needs about {_human(need_bytes)} ({need_what})"
            )


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(
    flag: str,
    path: str,
    inputs: dict[str, str | None] | None = None,
    others: dict[str, str | None] | None = None,
    overwrite: bool = False,
    overwrite_flag: str = "--overwrite_output_file",
    need_bytes: int = 0,
) -> Path:
    """An output file that is safe to write: not an input, not another output, a regular
    file if it exists (and then only with `overwrite`), in a writable folder on a disk
    with `need_bytes` free (an estimate of the file's size)."""
    p = expand_user(path)
    for in_flag, in_path in (inputs or {}).items():
        if in_path and (
            _same(p, expand_user(in_path)) or p.absolute() == expand_user(in_path).absolute()
        ):
            raise UsageError(
                f"{flag} {path}: is the same file as {in_flag}; it would be overwritten"
            )
    for out_flag, out_path in (others or {}).items():
        if out_path and expand_user(out_path).absolute() == p.absolute():
            raise UsageError(
                f"{flag} {path}: is the same file as {out_flag}; give two different files"
            )
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name like out.jsonl")
    if os.path.lexists(p):
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise UsageError(
                f"{flag} {path}: is {kind}; refusing to replace it, give a new file name"
            )
        if not overwrite:
            raise UsageError(
                f"{flag} {path}: exists; choose a new file name or pass {overwrite_flag}"
            )
    if not p.parent.absolute().is_dir():
        base = _existing_ancestor(p.parent.absolute())  # exists: the walk stops at "/"
        if not base.is_dir():
            raise UsageError(f"{flag} {path}: {base} is a file, not a folder")
        raise UsageError(f"{flag} {path}: folder {str(p.parent)!r} does not exist")
    check_writable_dir(flag, p.parent, need_bytes, "an estimate of the file's size")
    return p


def refuse_non_regular_target(path: Path) -> None:
    """Atomic writes rename a temp file over the target: never over a symlink or device."""
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
            raise UsageError(f"{path}: is a symlink or not a regular file; refusing to replace it")


def inside(child: Path, parent: Path) -> bool:
    child, parent = Path(child).resolve(), Path(parent).resolve()
    return child == parent or parent in child.parents


def lora_adapter_bytes(config, r: int, targets: Iterable[str]) -> int:
    """Rough fp32 size of a LoRA adapter from the base config (no model load): every
    target module of every layer gets r x (in + out) parameters."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 24)
    targets = list(targets)
    per_module = r * (hidden + max(hidden, inter))
    n = 7 if "all-linear" in targets else max(1, len(targets))
    return int(math.ceil(n * layers * per_module * 4))


def finetune_space_needed(adapter_bytes: int) -> int:
    """One checkpoint (adapter + AdamW's two moments = 3x) and the final adapter, plus
    the tokenizer files and slack."""
    return 4 * adapter_bytes + 32 * 1024 * 1024
