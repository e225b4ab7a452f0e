"""The data pipeline: load Alpaca rows, validate them all, tokenize with the prompt masked,
split train/validation without leakage, audit, and cache the result.

Flow of `prepare_data`: fingerprint (file bytes + tokenizer + template + settings) ->
cache hit? load it : read -> validate every row (one error listing all problems) ->
skip empty outputs / duplicates by policy -> tokenize prompt and response separately
(batched, fast tokenizer) -> fit to `cutoff_len` -> split -> audit -> cache atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_alpaca.data.audit import Audit, learned_segments, measure
from lora_alpaca.data.options import DataOptions
from lora_alpaca.data.sources import SourceFile, data_files, files_fingerprint, read_sources
from lora_alpaca.data.tokenize import Encoder
from lora_alpaca.data.tokenize import tokenize_example as tokenize_example  # re-export: public API
from lora_alpaca.data.validation import Problems, validate
from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import discard, rename_into_place, temp_dir_beside
from lora_alpaca.log import log
from lora_alpaca.progress import stage
from lora_alpaca.prompts import PromptTemplate

# Announce tokenizing this many rows before it starts (52K Alpaca rows: seconds with a fast
# tokenizer, minutes with a slow one); under it, only the closing line (a fraction of a second).
ANNOUNCE_ROWS = 5_000
CACHE_VERSION = "data-cache/1"  # bump when the tokenized output of the same inputs changes
MAX_VAL_SHARE = 0.2


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, labels (-100 = not learned), length, row
    val: Any  # datasets.Dataset | None
    audit: Audit
    fingerprint: str
    # Writes the tokenized cache when prepare_data was asked to defer it (no-op otherwise):
    # the caller runs it once every other check has passed, so an exit-2 writes nothing.
    save_cache: Any = lambda: None
    # The ChatRenderer conversation rows are (or would be) encoded with; None for
    # --data_format alpaca. Built once here and reused by training for its manifest.
    renderer: Any = None


def split_indices(n_rows: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/val row indices (each sorted) with a fixed seed. Duplicates were removed
    (or refused) before the split, so no held-out row also sits in training."""
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def effective_val_size(requested: float, n_rows: int) -> tuple[int, str | None]:
    """`val_set_size` shrunk to at most 20% of the rows (alpaca-lora's 2000 assumes big data);
    a fraction in (0, 1) is that share of the rows (at least one)."""
    if requested <= 0:
        return 0, None
    if requested < 1:
        return max(1, round(requested * n_rows)), None
    cap = int(n_rows * MAX_VAL_SHARE)
    if requested <= cap:
        return requested, None
    return cap, (
        f"--val_set_size {requested} is more than {int(MAX_VAL_SHARE * 100)}% of the "
        f"{n_rows} usable rows; using {cap}" + (" (no validation split)" if cap == 0 else "")
    )


def fingerprint_of(
    data_fp: str, encoder: Encoder, template: PromptTemplate, opts: DataOptions, renderer=None
) -> str:
    defaults = {"data_format": "auto", "chat_template": None, "train_on_turns": "all"}
    settings = {
        k: v
        for k, v in dataclasses.asdict(opts).items()
        if k != "data" and not (k in defaults and v == defaults[k])
    }
    parts = [CACHE_VERSION, data_fp, encoder.fingerprint(), template.to_dict(), settings]
    if renderer is not None:  # conversation data may be read: its exact template counts
        parts.append(renderer.jinja_source)
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _dataset(columns: dict[str, Any]):
    import datasets
    import pyarrow as pa

    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)))


def _build(
    opts: DataOptions,
    encoder: Encoder,
    template: PromptTemplate,
    source_name: str,
    sources: list[SourceFile],
    renderer=None,
):
    from lora_alpaca.data.conversations import build_conversations, detect_format

    fmt = opts.data_format if opts.data_format != "auto" else detect_format(sources)
    if fmt != "alpaca":
        n = sum(len(src.records) for src in sources)
        start = f"tokenizing {n:,} conversations" if n >= ANNOUNCE_ROWS else None
        with stage(start, f"tokenized {n:,} conversations", rate=(n, "conversations")):
            return build_conversations(opts, renderer, fmt, source_name, sources)
    rows = validate(sources, opts, source_name)
    n = len(rows.instructions)
    # No bar: the two batched calls run in Rust and report nothing in between.
    start = f"tokenizing {n:,} rows" if n >= ANNOUNCE_ROWS else None
    with stage(start, f"tokenized {n:,} rows", rate=(n, "rows")):
        batch = encoder.encode_rows(rows.instructions, rows.inputs, rows.outputs)
    problems = Problems(source_name)
    for i in batch.errors:
        problems.add(rows.positions[i], "too long", batch.error_messages[i], batch.error_hint)
    problems.raise_if_any()
    audit = Audit(
        source=source_name,
        template=template.name,
        cutoff_len=opts.cutoff_len,
        train_on_inputs=opts.train_on_inputs,
        add_eos_token=opts.add_eos_token,
        overlength=opts.overlength,
        rows_read=rows.rows_read,
        seed=opts.seed,
    )
    fits = np.flatnonzero(batch.kept)
    skipped = dict(rows.skipped)
    skipped["over --cutoff_len"] = len(batch.ids) - len(fits)
    keep, train_idx, val_idx = keep_and_split(
        audit,
        opts,
        skipped,
        fits,
        full_lengths=batch.full_lengths,
        lengths=batch.lengths,
        supervised=batch.supervised,
        truncated=batch.truncated,
        positions=rows.positions,
        noun="rows",
    )
    positions = [rows.positions[i] for i in keep]
    index = np.asarray(rows.index)[keep]
    tables = {}
    for name, sel in (("train", train_idx), ("val", val_idx)):
        tables[name] = batch.arrow_columns(keep[sel], index[sel]) if len(sel) else None
    ex_rows = _example_rows(rows.inputs, keep[train_idx])
    for j in ex_rows:
        k = keep[train_idx[j]]
        ids, labels = batch.row(k)
        audit.examples.append(
            {
                "position": positions[train_idx[j]],
                "segments": learned_segments(ids, labels, encoder.tokenizer),
            }
        )
    return tables, audit


def keep_and_split(
    audit: Audit,
    opts: DataOptions,
    skipped: dict[str, int],
    candidates: np.ndarray,
    *,
    full_lengths: np.ndarray,
    lengths: np.ndarray,
    supervised: np.ndarray,
    truncated: np.ndarray,
    positions: list[str],
    noun: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared tail of Alpaca rows and conversations: drop zero-learned rows by
    --allow_unsupervised, record skips, measure, and split -> (keep, train_idx, val_idx).

    candidates: row numbers that fit --cutoff_len; the arrays (see `measure`) and
    positions (printable row names) are indexed by row number.
    train_idx / val_idx index into `keep` (sorted).
    """
    keep = candidates
    if opts.allow_unsupervised:
        learned = supervised[keep]
        skipped["zero learned tokens"] = int((learned == 0).sum())
        keep = keep[learned > 0]
    audit.skipped = {k: v for k, v in skipped.items() if v}
    audit.rows_kept = len(keep)
    if not len(keep):
        why = ", ".join(f"{n} {k}" for k, n in audit.skipped.items())
        raise UsageError(f"{audit.source}: no {noun} left to train on (all skipped: {why})")
    measure(
        audit,
        full_lengths[keep],
        lengths[keep],
        supervised[keep],
        truncated[keep],
        [positions[i] for i in keep],
    )
    val_size, note = effective_val_size(opts.val_set_size, len(keep))
    if note:
        audit.notes.append(note)
    train_idx, val_idx = split_indices(len(keep), val_size, opts.seed)
    audit.train_rows, audit.val_rows = len(train_idx), len(val_idx)
    return keep, train_idx, val_idx


def _example_rows(inputs: list[str], source_rows: np.ndarray) -> list[int]:
    """Two examples to show: the first training row with an input and the first without."""
    with_input = next((j for j, r in enumerate(source_rows) if inputs[r]), None)
    without = next((j for j, r in enumerate(source_rows) if not inputs[r]), None)
    picks = [j for j in (with_input, without) if j is not None]
    if len(picks) < 2 and len(source_rows) > 1:
        picks = sorted(set(picks) | {0, 1})[:2]
    return sorted(picks)


def _write_arrow(path: Path, columns: dict) -> None:
    import pyarrow as pa

    table = pa.table(columns)
    # The Arrow streaming format is what `datasets.Dataset.from_file` memory-maps.
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _save_cache(path: Path, tables: dict, audit: Audit) -> None:
    """Write the cache entry in a temp folder and rename it into place (atomic)."""
    tmp = temp_dir_beside(path, prefix=f".{path.name}.")
    try:
        for name, cols in tables.items():
            if cols is not None:
                _write_arrow(tmp / f"{name}.arrow", cols)
        (tmp / "audit.json").write_text(
            json.dumps(audit.to_dict(), ensure_ascii=False), encoding="utf-8"
        )
        rename_into_place(tmp, path)  # False: another process cached the same fingerprint first
    except BaseException:
        discard(tmp)
        raise


def _load_cache(path: Path) -> tuple[Any, Any, Audit] | None:
    if not (path / "audit.json").is_file():
        return None
    import datasets

    try:
        audit = Audit.from_dict(json.loads((path / "audit.json").read_text(encoding="utf-8")))
        train = datasets.Dataset.from_file(str(path / "train.arrow"))
        val = (
            datasets.Dataset.from_file(str(path / "val.arrow"))
            if (path / "val.arrow").is_file()
            else None
        )
    except (OSError, ValueError, TypeError, json.JSONDecodeError):
        return None  # unreadable cache entry: rebuild it
    return train, val, audit


def default_cache_dir() -> Path:
    from lora_alpaca.default_model import cache_dir

    return cache_dir() / "datasets"


def prepare_data(
    opts: DataOptions,
    tokenizer,
    template: PromptTemplate,
    cache_dir: Path | None = None,
    for_training: bool = True,
    defer_cache: bool = False,
) -> PreparedData:
    """Load, validate, tokenize, split and audit `opts.data` (cached by fingerprint).

    for_training=False (audit only) reports rows with zero learned tokens instead of refusing.
    """
    _check_options(opts)
    encoder = Encoder(
        tokenizer,
        template,
        opts.cutoff_len,
        opts.train_on_inputs,
        opts.add_eos_token,
        opts.overlength,
    )
    files = data_files(opts.data)
    sources = None
    if files is not None:
        data_fp = files_fingerprint(files)
    else:  # a hub dataset: its fingerprint is only known once loaded (from its local cache)
        sources, data_fp = read_sources(opts.data)
    renderer = conversation_renderer(opts, tokenizer, template)
    fingerprint = fingerprint_of(data_fp, encoder, template, opts, renderer)
    entry = Path(cache_dir if cache_dir is not None else default_cache_dir()) / fingerprint
    cached = _load_cache(entry)
    pending = lambda: None  # noqa: E731 - nothing to save when the cache was hit
    if cached is None:
        if sources is None:
            sources, _ = read_sources(opts.data)
        tables, audit = _build(opts, encoder, template, opts.data, sources, renderer)

        def save() -> None:
            try:
                _save_cache(entry, tables, audit)
            except OSError as e:  # a read-only or full cache folder must not stop training
                log(f"warning: could not cache the tokenized data ({e})", tag="lora_alpaca")

        if defer_cache:
            pending = save
        else:
            save()
        cached = None if defer_cache else _load_cache(entry)
        if cached is None:  # deferred, or cache folder not writable: serve from memory
            train = _dataset(tables["train"])
            val = _dataset(tables["val"]) if tables["val"] is not None else None
            cached = (train, val, audit)
    train, val, audit = cached
    audit.source = opts.data  # the same bytes may have been cached under another path
    for note in audit.notes:
        log(f"warning: {note}", tag="lora_alpaca")
    if for_training and audit.zero_supervised_rows and not opts.allow_unsupervised:
        raise UsageError(
            f"{opts.data}: {audit.zero_supervised_rows} row(s) have zero learned tokens "
            f"({', '.join(audit.zero_supervised_positions)}); they teach nothing. Fix them, keep "
            "--add_eos_token true, or pass --allow_unsupervised to drop them"
        )
    return PreparedData(
        train=train,
        val=val,
        audit=audit,
        fingerprint=fingerprint,
        save_cache=pending,
        renderer=renderer,
    )


def conversation_renderer(opts: DataOptions, tokenizer, template: PromptTemplate):
    """The renderer conversation rows would use (None when the rows are Alpaca for sure)."""
    if opts.data_format == "alpaca":
        return None
    from lora_alpaca.chat_template import build_renderer, default_spec

    return build_renderer(tokenizer, opts.chat_template or default_spec(tokenizer), template)


def _check_options(opts: DataOptions) -> None:
    for flag, value, allowed in (
        ("--data_format", opts.data_format, ("auto", "alpaca", "sharegpt", "messages")),
        ("--train_on_turns", opts.train_on_turns, ("all", "last")),
        ("--overlength", opts.overlength, ("truncate", "drop", "error")),
        ("--empty_outputs", opts.empty_outputs, ("error", "skip")),
        ("--duplicates", opts.duplicates, ("skip", "error")),
    ):
        if value not in allowed:
            raise UsageError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    if opts.cutoff_len < 2:
        raise UsageError(f"--cutoff_len {opts.cutoff_len}: must be at least 2 tokens")
    if opts.val_set_size < 0:
        raise UsageError(f"--val_set_size {opts.val_set_size}: must be 0 (no validation) or more")
