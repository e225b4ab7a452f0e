"""The audit's numbers, checked by hand on a handful of rows.

A word-level tokenizer (one token per whitespace-separated word) makes every count easy
to verify on paper with the `alpaca_short` template:
no input:   "### Instruction:\\n{i}\\n\\n### Response:\\n"  -> 4 + words(i) tokens
with input: "... ### Input:\\n{x} ..."                       -> 6 + words(i) + words(x)
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_alpaca.data.audit import format_audit
from lora_alpaca.data.pipeline import DataOptions, prepare_data
from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import load_template

WORDS = "### Instruction: Input: Response: a b c d e f g h i j q r s x y".split()
ROWS = [
    {"instruction": "a b", "input": "", "output": "c d e"},  # 6 + 3 + EOS = 10
    {"instruction": "a", "input": "x y", "output": "c"},  # 9 + 1 + EOS = 11
    {"instruction": "a b c d e f", "input": "", "output": "g h i j"},  # 10 + 4 + 1 = 15: cut
    {"instruction": "a b", "input": "", "output": "c d e"},  # duplicate of row 1
    {"instruction": "q", "input": "", "output": ""},  # empty output
    {"instruction": "q", "input": "", "output": "r s"},  # 5 + 2 + 1 = 8
]


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def audit_of(tmp_path, tok, rows=ROWS, for_training=True, **kw):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    kw.setdefault("cutoff_len", 12)
    opts = DataOptions(data=str(f), empty_outputs="skip", val_set_size=0, **kw)
    return prepare_data(
        opts, tok, load_template("alpaca_short"), tmp_path / "cache", for_training=for_training
    )


def test_counts_lengths_truncation_and_learned_share(tmp_path, word_tok):
    got = audit_of(tmp_path, word_tok)
    a = got.audit
    assert (a.rows_read, a.rows_kept, a.train_rows, a.val_rows) == (6, 4, 4, 0)
    assert a.skipped == {"duplicate": 1, "empty output": 1}
    # uncut lengths 10, 11, 15, 8 -> percentiles take the next real value up
    assert a.length_percentiles == {"p50": 11, "p90": 15, "p99": 15, "max": 15}
    assert a.recommended_cutoff_len == 32
    # row 3 cut to 12: prompt shrunk to 7 ("a b c"), response kept whole, EOS
    assert a.truncated_rows == 1 and a.truncated_share == 0.25
    assert list(got.train["length"]) == [10, 11, 12, 8]
    assert a.total_tokens == 41
    assert a.supervised_tokens == 4 + 2 + 5 + 3
    assert a.zero_supervised_rows == 0
    cut = word_tok.decode(got.train[2]["input_ids"])
    assert cut == "### Instruction: a b c ### Response: g h i j </s>"


def test_report_text(tmp_path, word_tok):
    """The one rendered snapshot of the audit (the other tests assert its fields): the
    whole plain report, the coloured spans, and the lines only some audits have."""
    audit = audit_of(tmp_path, word_tok).audit
    assert format_audit(audit, color=False) == "\n".join(
        [
            f"Data audit: {tmp_path / 'rows.json'} (template alpaca_short, --cutoff_len 12, "
            "--train_on_inputs false, --add_eos_token true)",
            "  rows: 6 read, 4 kept, 2 skipped (1 duplicate, 1 empty output)",
            "  split: 4 train / 0 validation (seed 42)",
            "  tokens per example before cutting (prompt + response + special tokens): "
            "p50 11, p90 15, p99 15, max 15",
            "  recommended --cutoff_len 32 (fits 99% of rows uncut)",
            "  rows truncated at --cutoff_len 12: 1 (25.0%; --overlength truncate)",
            "  learned (supervised) tokens: 14 of 41 (34.1%)",
            "  rows with zero learned tokens: 0",
            # the first row without input and the first with one, learned spans marked
            "  example 1 (row 1); learned tokens between [[ and ]]:",
            "    ### Instruction: a b ### Response:[[c d e </s>]]",
            "  example 2 (row 2); learned tokens between [[ and ]]:",
            "    ### Instruction: a ### Input: x y ### Response:[[c </s>]]",
        ]
    )
    coloured = format_audit(audit, color=True)
    assert "\x1b[32mc d e </s>\x1b[0m" in coloured and "[[" not in coloured
    # Capped at the model's context, rows that learn nothing, three reasons to skip.
    other = dataclasses.replace(
        audit, context_len=16, zero_supervised_rows=1, zero_supervised_positions=["row 1"],
        skipped={"duplicate": 1, "empty output": 1, "over --cutoff_len": 1}, examples=[],
    )  # fmt: skip
    lines = format_audit(other, color=False).split("\n")
    assert (
        "  rows: 6 read, 4 kept, 3 skipped (1 duplicate, 1 empty output, 1 over --cutoff_len)"
        in lines
    )
    assert (
        "  recommended --cutoff_len 16: the model's context (99% of rows would need 32; "
        "longer rows are cut)" in lines
    )
    assert "  rows with zero learned tokens: 1 (row 1)" in lines


def test_train_on_inputs_learns_every_token(tmp_path, word_tok):
    a = audit_of(tmp_path, word_tok, train_on_inputs=True).audit
    assert a.supervised_tokens == a.total_tokens == 41 and a.supervised_share == 1.0


def test_drop_policy_counts_the_dropped_row(tmp_path, word_tok):
    got = audit_of(tmp_path, word_tok, overlength="drop")
    a = got.audit
    assert a.skipped == {"duplicate": 1, "empty output": 1, "over --cutoff_len": 1}
    assert a.rows_kept == 3 and list(got.train["row"]) == [0, 1, 5]
    assert a.length_percentiles["max"] == 11 and a.truncated_rows == 0


# A row whose prompt fills the whole budget learns nothing without EOS: cutoff 8, no EOS;
# "a" + input "x" renders to 8 tokens (fields already at 1 token: cannot shrink further).
UNSUPERVISED = [
    {"instruction": "a", "input": "x", "output": "c"},
    {"instruction": "q", "input": "", "output": "r s"},
]


def test_zero_learned_tokens_refused_reported_or_dropped(tmp_path, word_tok):
    kw = dict(rows=UNSUPERVISED, add_eos_token=False, cutoff_len=8)
    with pytest.raises(UsageError) as e:
        audit_of(tmp_path, word_tok, **kw)
    assert "1 row(s) have zero learned tokens (row 1)" in str(e.value)
    assert "--allow_unsupervised" in str(e.value)

    audit_only = audit_of(tmp_path, word_tok, for_training=False, **kw).audit
    assert audit_only.zero_supervised_rows == 1 and audit_only.zero_supervised_positions == [
        "row 1"
    ]

    allowed = audit_of(tmp_path, word_tok, allow_unsupervised=True, **kw)
    assert allowed.audit.skipped == {"zero learned tokens": 1}
    assert list(allowed.train["row"]) == [1] and allowed.audit.zero_supervised_rows == 0


def test_control_characters_in_examples_are_shown_escaped(tmp_path, word_tok):
    from lora_alpaca.data.audit import render_example

    shown = render_example([["a\x1b[31m b\x00", False], ["c\nd", True]], color=False)
    assert shown == "    a\\x1b[31m b\\x00[[c\n    d]]"
