"""Read raw instruction rows from .json / .jsonl / .csv / .parquet files, a folder of
those, or a `datasets` hub id, with exact positions for every error.

Plain JSON, JSONL and CSV are read with the standard library on purpose: `json` reports
the line and column of a syntax error and lets us number JSONL rows by file line, and
`csv` keeps every cell a string (the `datasets`/pandas CSV reader turns cells such as
"NA", "null" or "1" into NaN/ints, silently changing training text). Parquet goes through
pyarrow and hub ids through `datasets.load_dataset`, which do those jobs well.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import loads_json, shorten
from lora_alpaca.fileio import expand_user

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_LISTED = 10  # broken lines listed in one error before "... and N more"


@dataclass
class SourceFile:
    """The records of one file, in file order, and how to name a record's position."""

    name: str  # shown in messages: the path as given, or the file name inside a folder
    unit: str  # "row" (JSON array, parquet, hub) or "line" (JSONL, CSV)
    records: list[Any]
    numbers: list[int] | None = None  # 1-based position of each record; None = index + 1
    columns: list[str] | None = None  # header / schema columns, when the format has them

    def position(self, i: int) -> str:
        return f"{self.unit} {self.numbers[i] if self.numbers is not None else i + 1}"


def _flag(spec: str) -> str:
    return f"--data {spec}"


def _decode(raw: bytes, name: str) -> str:
    if not raw.strip():
        raise UsageError(
            f"{name}: file is empty (expected Alpaca rows with instruction, input, output)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UsageError(
            f"{name}: not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at line {line} "
            f"(byte offset {e.start}); re-save the file as UTF-8"
        ) from None


def _read_jsonl(text: str, name: str) -> SourceFile:
    records, numbers, broken = [], [], []
    # split("\n"), not splitlines(): U+2028 and friends may legally appear inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(loads_json(line, f"{name} line {lineno}"))
            numbers.append(lineno)
        except json.JSONDecodeError as e:
            broken.append(f"line {lineno} column {e.colno}: {e.msg}")
    if broken:
        shown = "; ".join(broken[:MAX_LISTED])
        more = f"; ... and {len(broken) - MAX_LISTED} more" if len(broken) > MAX_LISTED else ""
        raise UsageError(f"{name}: invalid JSON Lines: {len(broken)} broken line(s): {shown}{more}")
    return SourceFile(name, "line", records, numbers)


def _read_json(text: str, name: str) -> SourceFile:
    try:
        data = loads_json(text, name)
    except json.JSONDecodeError as e:
        # A `.json` file holding one object per line (what `datasets` writes) is JSONL.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(text, name)
        raise UsageError(
            f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f"; the rows may be the list under key {lists[0]!r}: extract it" if lists else ""
        keys = ", ".join(list(map(str, data))[:8])
        raise UsageError(
            f"{name}: expected a JSON array of rows, got an object (keys: {keys}){hint}"
        )
    if not isinstance(data, list):
        raise UsageError(f"{name}: expected a JSON array of rows, got {type(data).__name__}")
    return SourceFile(name, "row", data)


def _read_csv(text: str, name: str) -> SourceFile:
    # Long responses exceed csv's default 128 KiB cell limit; raise it (a process-wide
    # setting, but no caller wants the small limit for training data).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        header = [h.strip() for h in header]
        records, numbers = [], []
        line = reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                # A short line leaves its last columns out (-> "missing key" per row).
                records.append(dict(zip(header, cells, strict=False)))
                numbers.append(line)
            line = reader.line_num + 1
    except csv.Error as e:
        raise UsageError(f"{name}: invalid CSV at line {reader.line_num}: {e}") from None
    return SourceFile(name, "line", records, numbers, columns=header)


def _read_parquet(path: Path, name: str) -> SourceFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"{name}: not a readable Parquet file ({shorten(e)})") from None
    return SourceFile(name, "row", table.to_pylist(), columns=list(table.column_names))


def read_file(path: Path, name: str) -> SourceFile:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if path.stat().st_size == 0:
            raise UsageError(f"{name}: file is empty")
        return _read_parquet(path, name)
    text = _decode(path.read_bytes(), name)
    if suffix == ".jsonl":
        return _read_jsonl(text, name)
    if suffix == ".csv":
        return _read_csv(text, name)
    return _read_json(text, name)


def data_files(spec: str) -> list[Path] | None:
    """The files behind `--data` (one file, or a folder's supported files), or None for a
    hub id. Raises UsageError for paths that exist but cannot be data."""
    path = expand_user(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise UsageError(
                f"{_flag(spec)}: folder has no {'/'.join(SUFFIXES)} files (found: {found})"
            )
        return files
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UsageError(
                f"{_flag(spec)}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(SUFFIXES)}"
            )
        return [path]
    if path.exists():
        raise UsageError(f"{_flag(spec)}: not a regular file or folder")
    if (
        spec.lower().endswith(SUFFIXES)
        or spec.startswith((".", "/", "~"))
        or not HUB_ID_RE.match(spec)
    ):
        raise UsageError(f"{_flag(spec)}: no such file or folder")
    return None


def files_fingerprint(files: list[Path]) -> str:
    """Hash of the files' bytes (names included): cheap next to parsing, exact for caching."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_hub_dataset(spec: str) -> tuple[SourceFile, str]:
    """Rows of the `train` split of a hub dataset (or one cached offline) + its fingerprint."""
    from lora_alpaca.models import offline_unless_hub_reachable

    offline_unless_hub_reachable()
    try:
        import datasets

        loaded = datasets.load_dataset(spec)
    except Exception as e:  # network, auth and not-found errors come in many types
        reason = shorten(e, 160)
        raise UsageError(
            f"{_flag(spec)}: not a local file or folder, and loading it as a Hugging Face hub "
            f"dataset failed ({type(e).__name__}: {reason}); offline or unknown id: download "
            "it and pass the local file"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UsageError(
                f"{_flag(spec)}: hub dataset has no 'train' split (splits: {', '.join(loaded)})"
            )
        loaded = loaded["train"]
    source = SourceFile(spec, "row", loaded.to_list(), columns=list(loaded.column_names))
    return source, f"hub:{spec}:{loaded._fingerprint}"


def read_sources(spec: str) -> tuple[list[SourceFile], str]:
    """All records behind `--data` and a fingerprint of their content."""
    files = data_files(spec)
    if files is None:
        source, fingerprint = load_hub_dataset(spec)
        return [source], fingerprint
    single = len(files) == 1 and not expand_user(spec).is_dir()
    sources = [read_file(p, spec if single else p.name) for p in files]
    return sources, files_fingerprint(files)
