"""The one set of atomic writes: every file and folder the toolkit produces goes through here.

A file is written to a temp file beside it, fsynced and renamed over the target; a folder is
filled inside a private temp folder beside its destination and renamed into place. A crash
therefore never leaves a half-written file or folder where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file + fsync + rename: a crash never leaves a half-written file."""
    path = Path(path)
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
