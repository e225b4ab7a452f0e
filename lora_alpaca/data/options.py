"""What the data pipeline needs to know: which file, which columns, how to tokenize, what to
do with bad rows. Its own module because both the pipeline and the row validation read it."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DataOptions:
    data: str  # path (.json/.jsonl/.csv/.parquet/folder) or hub id
    instruction_column: str = "instruction"
    input_column: str = "input"  # optional column: absent => no input
    output_column: str = "output"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    add_eos_token: bool = True
    overlength: str = "truncate"  # truncate | drop | error
    empty_outputs: str = "skip"  # skip | error (the finetune default: alpaca_data.json has 28)
    duplicates: str = "skip"  # skip | error
    val_set_size: float = 2000  # rows (or a fraction in (0, 1) of them); 0 = no validation split
    seed: int = 42
    allow_unsupervised: bool = False  # drop rows with zero learned tokens instead of refusing
    data_format: str = "auto"  # auto | alpaca | sharegpt | messages (data/conversations.py)
    chat_template: str | None = None  # conversations: base | alpaca | PATH.jinja (None: default)
    train_on_turns: str = "all"  # conversations: all | last assistant turns learned

    @classmethod
    def from_config(cls, cfg) -> DataOptions:
        """The options from a command's config (FinetuneConfig): every field of the same name,
        so a data setting is declared once per command and never copied by hand."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})
