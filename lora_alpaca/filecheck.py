"""Cheap integrity checks on files we are about to read, so a damaged file is one clear
line instead of a traceback from deep inside a library.

- safetensors: the 8-byte header length and the JSON header are read (no tensor data) and
  the file must be exactly as long as the header says: a truncated download or copy is
  caught before transformers/peft try to map it.
- adapters: the LoRA shapes in `adapter_model.safetensors` must match the rank in
  `adapter_config.json` (and the manifest's), or PEFT fails late with a size-mismatch dump.
- JSON: a document nested so deeply that the parser overflows the stack is refused; a
  row file (JSON array or JSONL) is read with one line naming the file and line on error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lora_alpaca.errors import UsageError


def shorten(text: object, limit: int = 200) -> str:
    """One line, at most `limit` characters (plus " ..."), never cut inside a word: at the
    last space if that keeps over half, else after the last character that is not a letter
    or digit (`-`, `_`, `/`, `.` inside a long identifier), else at the last space at all."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    head = flat[: limit + 1]  # a cut right before a boundary at `limit` keeps the whole word
    space = head.rfind(" ")
    if space > limit // 2:
        return flat[:space] + " ..."
    mark = max((i for i, c in enumerate(head[:limit]) if not c.isalnum()), default=-1)
    if mark > limit // 2:
        return flat[: mark + 1] + " ..."
    return (flat[:space] if space > 0 else flat[:limit]) + " ..."


def loads_json(text: str, where: str):
    """json.loads whose RecursionError (nesting too deep) is a one-line UsageError;
    JSONDecodeError is left to the caller, which knows how to name lines and rows."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError(
            f"{where}: JSON nested too deeply to read (thousands of levels); rows must be flat objects"
        ) from None


def read_json_rows(path: str, flag: str) -> list[tuple[str, object]]:
    """The rows of a JSON array or JSONL file as `(where, row)`, where naming the row
    (`row 3` of an array, `line 7` of JSONL); a missing, non-UTF-8 or invalid file is one
    UsageError line naming `flag` and the file. The caller checks each row's fields."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag}: no such file {path!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            data = loads_json(text, f"{flag} {path}")
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return [(f"row {i}", r) for i, r in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", loads_json(line, f"{flag} {path} line {n}")))
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} {path} line {n}: invalid JSON ({e.msg})") from None
    return rows


def safetensors_header(path: Path, flag: str) -> dict:
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length points past the end of the file")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{flag}: {path} is not a readable safetensors file ({shorten(e, 80)}); it is damaged or truncated, copy it again"
        ) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise UsageError(
            f"{flag}: {path} is truncated or damaged ({size:,} bytes, its header says {8 + n + end:,}); copy or download it again"
        )
    return header


def check_model_folder(folder: Path, flag: str) -> None:
    """Every *.safetensors file in a model folder is whole."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        safetensors_header(f, flag)


def check_adapter_shapes(adapter_dir: Path, flag: str, manifest: dict | None = None) -> None:
    """adapter_config.json's r (and the manifest's lora_r) against the saved tensors."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    cfg_path = adapter_dir / "adapter_config.json"
    if not weights.is_file():
        return
    header = safetensors_header(weights, flag)
    if not cfg_path.is_file():
        raise UsageError(f"{flag} {adapter_dir}: no adapter_config.json beside the weights")
    try:
        config = loads_json(cfg_path.read_text(encoding="utf-8"), f"{flag} {cfg_path}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{flag} {cfg_path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag} {cfg_path}: expected a JSON object")
    ranks = {
        v["shape"][0]
        for k, v in header.items()
        if k != "__metadata__" and "lora_A" in k and len(v.get("shape", [])) == 2
    }
    declared = {"adapter_config.json": config.get("r")}
    if manifest and isinstance(manifest.get("lora"), dict) and "lora_r" in manifest["lora"]:
        declared["lora_alpaca.json"] = manifest["lora"]["lora_r"]
    if config.get("rank_pattern"):
        return  # per-module ranks: PEFT checks those itself
    for source, r in declared.items():
        if ranks and r is not None and ranks != {r}:
            raise UsageError(
                f"{flag} {adapter_dir}: {source} says r={r} but adapter_model.safetensors holds "
                f"rank {', '.join(map(str, sorted(ranks)))} weights; the files come from different runs"
            )
