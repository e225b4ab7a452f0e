"""Data: read Alpaca-format sources, validate rows, tokenize with token-id masks, audit, pack.

The public API is what finetune needs and what a new data capability builds on; the modules'
underscore names stay private.
"""

from lora_alpaca.data.audit import Audit, format_audit, learned_segments
from lora_alpaca.data.options import DataOptions
from lora_alpaca.data.packing import count_supervised, pack_rows, pad_rows
from lora_alpaca.data.pipeline import PreparedData, prepare_data, split_indices
from lora_alpaca.data.sources import SourceFile, data_files, read_sources
from lora_alpaca.data.tokenize import Encoder, tokenize_example
from lora_alpaca.data.validation import validate

__all__ = [
    "Audit",
    "DataOptions",
    "Encoder",
    "PreparedData",
    "SourceFile",
    "count_supervised",
    "data_files",
    "format_audit",
    "learned_segments",
    "pack_rows",
    "pad_rows",
    "prepare_data",
    "read_sources",
    "split_indices",
    "tokenize_example",
    "validate",
]
