"""The data pipeline: token-level masking and truncation, every input format, every bad
input as a one-line error naming the file and row, the split, the cache, and the real
52,002-row Alpaca file end to end with the real SmolLM2 tokenizer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lora_alpaca.data.pipeline import DataOptions, prepare_data, split_indices, tokenize_example
from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import load_template

ROWS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, move, sleep.",
    },
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Classify the sentiment.", "input": "I love it!", "output": "positive"},
    {
        "instruction": "Translate the sentence into French.",
        "input": "The dog.",
        "output": "Le chien.",
    },
    {"instruction": "Write a word.", "input": "", "output": "fox"},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3"},
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def bos_tok(tiny_model):
    """The same tokenizer, configured to add BOS by default like LLaMA's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, add_bos_token=True)


@pytest.fixture(scope="module")
def alpaca():
    return load_template("alpaca")


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path: Path, rows) -> Path:
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def prep(tmp_path, tok, data, template="alpaca", **kw):
    return prepare_data(
        DataOptions(data=str(data), **kw),
        tok,
        load_template(template),
        cache_dir=tmp_path / "cache",
    )


def error_of(tmp_path, tok, data, **kw) -> str:
    with pytest.raises(UsageError) as e:
        prep(tmp_path, tok, data, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- masking at token level --------------------------------------------------------


def test_prompt_masked_response_and_eos_learned(tok, alpaca):
    ex = tokenize_example(
        "Classify the sentiment.", "I love it!", "positive", tok, alpaca, cutoff_len=256
    )
    p = plain(tok, alpaca.build_prompt("Classify the sentiment.", "I love it!"))
    r = plain(tok, "positive")
    assert ex["input_ids"] == p + r + [tok.eos_token_id]
    first = next(i for i, y in enumerate(ex["labels"]) if y != -100)
    assert first == len(p)  # the first learned token is the first response token
    assert ex["labels"][first:] == r + [tok.eos_token_id]
    assert ex["labels"][-1] == ex["input_ids"][-1] == tok.eos_token_id
    assert ex["length"] == len(ex["input_ids"]) and not ex["truncated"]


def test_train_on_inputs_learns_everything(tok, alpaca):
    ex = tokenize_example("Write a word.", "", "fox", tok, alpaca, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_bos_added_once_when_the_tokenizer_adds_it(bos_tok, tok, alpaca):
    ex = tokenize_example("Write a word.", "", "fox", bos_tok, alpaca)
    assert ex["input_ids"][0] == bos_tok.bos_token_id
    assert ex["input_ids"].count(bos_tok.bos_token_id) == 1
    assert ex["labels"][0] == -100
    assert (
        ex["input_ids"][1:]
        == tokenize_example("Write a word.", "", "fox", tok, alpaca)["input_ids"]
    )
    # SmolLM2-like tokenizers that add no BOS get none
    assert (
        tok.bos_token_id
        not in tokenize_example("Write a word.", "", "fox", tok, alpaca)["input_ids"]
    )


def test_no_eos_when_add_eos_token_false(tok, alpaca):
    ex = tokenize_example("Write a word.", "", "fox", tok, alpaca, add_eos_token=False)
    assert tok.eos_token_id not in ex["input_ids"]
    assert ex["input_ids"][-len(plain(tok, "fox")) :] == plain(tok, "fox")


def test_special_token_text_in_a_row_is_not_a_special_token(tok, alpaca):
    ex = tokenize_example("Say </s> twice.", "", "ok </s> ok", tok, alpaca)
    assert ex["input_ids"].count(tok.eos_token_id) == 1 and ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_of_a_long_response_keeps_prompt_and_eos(tok, alpaca):
    out = "The quick brown fox jumps over the lazy dog. " * 40
    p = plain(tok, alpaca.build_prompt("Write a story.", ""))
    cutoff = 2 * len(p) + 10  # the prompt fits in half the budget: it is not cut
    ex = tokenize_example("Write a story.", "", out, tok, alpaca, cutoff_len=cutoff)
    assert ex["truncated"] and ex["length"] == cutoff
    assert ex["input_ids"][: len(p)] == p
    assert ex["input_ids"][len(p) : -1] == plain(tok, out)[: cutoff - len(p) - 1]
    assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("where", ["instruction", "input"])
def test_truncation_of_a_long_prompt_keeps_header_marker_and_response(tok, alpaca, where):
    long = "Give three tips for staying healthy. " * 200
    fields = {"instruction": "Classify the sentiment.", "input": "I love it!"}
    fields[where] = long
    ex = tokenize_example(
        fields["instruction"], fields["input"], "positive", tok, alpaca, cutoff_len=96
    )
    assert ex["truncated"] and ex["length"] <= 96
    r = plain(tok, "positive")
    assert ex["input_ids"][-len(r) - 1 :] == r + [tok.eos_token_id]
    assert ex["labels"][-len(r) - 1 :] == r + [tok.eos_token_id]
    prompt_text = tok.decode(
        [t for t, y in zip(ex["input_ids"], ex["labels"], strict=True) if y == -100]
    )
    assert prompt_text.startswith(
        "Below is an instruction that describes a task, paired with an input"
    )
    assert prompt_text.endswith("\n\n### Response:\n")
    assert "### Instruction:\n" in prompt_text and "### Input:\n" in prompt_text


def test_both_long_prompt_gets_half_the_budget(tok, alpaca):
    long = "The quick brown fox jumps over the lazy dog. " * 100
    ex = tokenize_example(long, "", long, tok, alpaca, cutoff_len=100)
    n_prompt = sum(1 for y in ex["labels"] if y == -100)
    assert ex["length"] == 100 and n_prompt <= 99 // 2
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_overlength_drop_and_error(tok, alpaca):
    out = "The quick brown fox. " * 50
    assert (
        tokenize_example("Write.", "", out, tok, alpaca, cutoff_len=32, overlength="drop") is None
    )
    with pytest.raises(UsageError, match="more than --cutoff_len 32"):
        tokenize_example("Write.", "", out, tok, alpaca, cutoff_len=32, overlength="error")


def test_cutoff_too_small_for_the_template_is_reported(tok, alpaca):
    with pytest.raises(UsageError, match="the prompt template alone"):
        tokenize_example("Write a word. " * 20, "", "fox", tok, alpaca, cutoff_len=10)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    instruction=st.text(min_size=0, max_size=300),
    input=st.text(max_size=300),
    output=st.text(min_size=0, max_size=600),
    cutoff=st.integers(min_value=2, max_value=200),
    train_on_inputs=st.booleans(),
)
def test_any_text_gives_a_valid_example_or_a_clear_error(
    tok, alpaca, instruction, input, output, cutoff, train_on_inputs
):
    try:
        ex = tokenize_example(
            instruction,
            input,
            output,
            tok,
            alpaca,
            cutoff_len=cutoff,
            train_on_inputs=train_on_inputs,
        )
    except UsageError as e:
        assert "\n" not in str(e) and "cutoff_len" in str(e)
        return
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == ex["length"] <= cutoff
    assert ids[-1] == labels[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    learned = [i for i, y in enumerate(labels) if y != -100]
    assert learned == list(range(learned[0], len(ids)))  # one contiguous learned tail
    assert all(labels[i] == ids[i] for i in learned)


FIELD = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=5),  # surrogates too
    st.none(),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
)


TEXT = st.text(min_size=1, max_size=200).filter(str.strip)
VALID_ROW = st.fixed_dictionaries(
    {"instruction": TEXT, "output": TEXT},
    optional={"input": st.one_of(st.text(max_size=80), st.none())},
)
ANY_ROW = st.dictionaries(st.sampled_from(["instruction", "input", "output"]), FIELD)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.one_of(
        st.lists(VALID_ROW, max_size=6), st.lists(st.one_of(VALID_ROW, ANY_ROW), max_size=6)
    ),
    empty_outputs=st.sampled_from(["error", "skip"]),
)
@example(
    rows=[
        {"instruction": "Say\x00 hi \u2028", "output": "\x1b[31mhi"},
        {"instruction": "a", "output": " "},
    ],
    empty_outputs="skip",
)  # the success path, always
def test_any_rows_give_valid_examples_or_one_clear_error(
    tmp_path_factory, tok, rows, empty_outputs
):
    d = tmp_path_factory.mktemp("prop")
    f = d / "rows.json"
    f.write_text(json.dumps(rows), encoding="utf-8")
    try:
        got = prepare_data(
            DataOptions(data=str(f), empty_outputs=empty_outputs, cutoff_len=64),
            tok,
            load_template("alpaca"),
            cache_dir=d / "cache",
        )
    except UsageError as e:
        assert "\n" not in str(e) and str(f) in str(e)
        return
    a = got.audit
    assert a.rows_read == len(rows) == a.rows_kept + sum(a.skipped.values())
    assert a.train_rows + a.val_rows == a.rows_kept
    for ds in (got.train, got.val) if got.val is not None else (got.train,):
        for ex in ds:
            ids, labels = ex["input_ids"], ex["labels"]
            assert len(ids) == len(labels) == ex["length"] <= 64
            assert ids[-1] == labels[-1] == tok.eos_token_id
            src = rows[ex["row"]]
            assert src["instruction"].strip() and src["output"].strip()


# --- formats -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_format_gives_the_same_examples(tmp_path, tok, suffix):
    ref = prep(tmp_path, tok, write(tmp_path / "ref.json", ROWS), val_set_size=0)
    got = prep(tmp_path, tok, write(tmp_path / f"rows{suffix}", ROWS), val_set_size=0)
    assert list(got.train["input_ids"]) == list(ref.train["input_ids"])
    assert list(got.train["labels"]) == list(ref.train["labels"])
    assert list(got.train["row"]) == list(range(len(ROWS)))
    assert list(got.train["length"]) == [len(x) for x in list(ref.train["input_ids"])]


def test_a_folder_of_files_and_json_lines_in_a_json_file(tmp_path, tok):
    d = tmp_path / "folder"
    d.mkdir()
    write(d / "a.json", ROWS[:3])
    write(d / "b.jsonl", ROWS[3:])
    (d / "README.md").write_text("not data")
    ref = prep(tmp_path, tok, write(tmp_path / "ref.json", ROWS), val_set_size=0)
    assert list(prep(tmp_path, tok, d, val_set_size=0).train["input_ids"]) == list(
        ref.train["input_ids"]
    )
    as_lines = tmp_path / "lines.json"
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert list(prep(tmp_path, tok, as_lines, val_set_size=0).train["input_ids"]) == list(
        ref.train["input_ids"]
    )


def test_configurable_columns_and_absent_input_column(tmp_path, tok):
    rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in ROWS if not r["input"]]
    f = write(tmp_path / "pc.csv", rows)
    got = prep(
        tmp_path, tok, f, instruction_column="prompt", output_column="completion", val_set_size=0
    )
    want = [
        tokenize_example(r["prompt"], "", r["completion"], tok, load_template("alpaca"))[
            "input_ids"
        ]
        for r in rows
    ]
    assert list(got.train["input_ids"]) == want


def test_null_input_means_no_input(tmp_path, tok):
    rows = [{**ROWS[0], "input": None}, ROWS[1]]
    got = prep(tmp_path, tok, write(tmp_path / "n.json", rows), val_set_size=0)
    assert (
        list(got.train["input_ids"])[0]
        == tokenize_example(
            ROWS[0]["instruction"], "", ROWS[0]["output"], tok, load_template("alpaca")
        )["input_ids"]
    )


def test_hub_id_goes_through_load_dataset_and_fails_clearly_offline(tmp_path):
    code = (
        "from lora_alpaca.data.sources import read_sources\n"
        "from lora_alpaca.errors import UsageError\n"
        "try:\n    read_sources('lora-alpaca-tests/no-such-dataset')\n"
        "except UsageError as e:\n    print('USAGE:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert (
        "USAGE: --data lora-alpaca-tests/no-such-dataset: not a local file or folder" in proc.stdout
    )
    assert (
        "hub dataset failed (ConnectionError: " in proc.stdout
        and "offline or unknown id" in proc.stdout
    )


# --- bad inputs: one line, file and row named ---------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path, tok):
    f = tmp_path / "bad.json"
    f.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n'
    )
    msg = error_of(tmp_path, tok, f)
    assert msg.startswith(f"{f}: invalid JSON at line 3 column 23: Expecting ',' delimiter")


def test_json_object_instead_of_a_list(tmp_path, tok):
    f = tmp_path / "obj.json"
    f.write_text(json.dumps({"data": ROWS}))
    assert (
        "expected a JSON array of rows, got an object (keys: data); the rows may be the list under key 'data'"
        in error_of(tmp_path, tok, f)
    )
    f.write_text('"just a string"')
    assert "expected a JSON array of rows, got str" in error_of(tmp_path, tok, f)


def test_jsonl_with_a_broken_line(tmp_path, tok):
    f = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines[3] = lines[3][:-5]
    f.write_text("\n".join(lines) + "\n")
    msg = error_of(tmp_path, tok, f)
    assert "invalid JSON Lines: 1 broken line(s): line 4 column" in msg


def test_wrong_column_names_list_the_columns_present(tmp_path, tok):
    f = write(tmp_path / "pc.json", [{"prompt": "a", "completion": "b"}])
    assert error_of(tmp_path, tok, f) == (
        f"--instruction_column 'instruction': no such column in {f}; columns present: prompt, completion"
    )
    f = write(tmp_path / "io.json", [{"instruction": "a", "answer": "b"}])
    assert "--output_column 'output': no such column" in error_of(tmp_path, tok, f)
    assert "--input_column 'context': no such column" in error_of(
        tmp_path, tok, write(tmp_path / "ok.json", ROWS), input_column="context"
    )


def test_all_row_problems_in_one_error_with_row_numbers(tmp_path, tok):
    rows = [
        ROWS[0],
        {"instruction": "a"},  # row 2
        {"instruction": "a", "input": 3, "output": "b"},  # row 3
        {"instruction": None, "output": "b"},  # row 4
        {"instruction": "  ", "output": "b"},  # row 5
        {"instruction": "a", "output": ""},  # row 6
        ["a", "b"],  # row 7
        {"instruction": "a", "output": ["b"]},
    ]  # row 8
    f = write(tmp_path / "bad.json", rows)
    msg = error_of(tmp_path, tok, f, empty_outputs="error")
    assert msg.startswith(
        f"{f}: 7 problems: row 2: missing key 'output'; row 3: 'input' is int, "
        "expected a string; row 4: 'instruction' is null, expected a string; "
        "row 5: empty instruction; row 6: empty output; row 7: expected an object"
    )
    assert "row 8: 'output' is list, expected a string" in msg
    assert "hint: --empty_outputs skip drops rows with an empty output" in msg


def test_thousands_of_problems_are_summarised(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": ""} for i in range(3000)] + [
        {"instruction": "x"}
    ] * 5
    msg = error_of(tmp_path, tok, write(tmp_path / "many.jsonl", rows), empty_outputs="error")
    assert msg.startswith(
        f"{tmp_path / 'many.jsonl'}: 3005 problems: line 1: empty output; line 2: empty output"
    )
    assert "... and 2995 more (in all: 3000 empty output, 5 missing 'output')" in msg
    assert len(msg) < 1500


def test_empty_outputs_skip_and_all_rows_empty(tmp_path, tok):
    rows = ROWS + [{"instruction": "a", "input": "", "output": " \n"}]
    got = prep(
        tmp_path, tok, write(tmp_path / "e.json", rows), empty_outputs="skip", val_set_size=0
    )
    assert got.audit.skipped == {"empty output": 1} and len(got.train) == len(ROWS)
    only_empty = write(tmp_path / "all.json", [{"instruction": "a", "output": ""}] * 3)
    assert "no rows left to train on (all 3 skipped: 3 empty output)" in error_of(
        tmp_path, tok, only_empty, empty_outputs="skip"
    )


def test_duplicates_skip_or_error(tmp_path, tok):
    rows = ROWS + [ROWS[2], ROWS[2], {**ROWS[2], "output": "negative"}]
    f = write(tmp_path / "d.json", rows)
    got = prep(tmp_path, tok, f, val_set_size=0)
    assert got.audit.skipped == {"duplicate": 2}
    assert list(got.train["row"]) == [0, 1, 2, 3, 4, 5, 8]
    msg = error_of(tmp_path, tok, f, duplicates="error")
    assert "row 7: exact duplicate of row 3; row 8: exact duplicate of row 3" in msg


def test_empty_file_empty_list_non_utf8_surrogates(tmp_path, tok):
    for name, content in [("e.json", b""), ("e.jsonl", b"\n\n"), ("e.csv", b"")]:
        f = tmp_path / name
        f.write_bytes(content)
        assert (
            error_of(tmp_path, tok, f)
            == f"{f}: file is empty (expected Alpaca rows with instruction, input, output)"
        )
    f = tmp_path / "list.json"
    f.write_text("[]")
    assert "no rows" in error_of(tmp_path, tok, f)
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n"
        + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1")
    )
    assert "not UTF-8 text: invalid byte 0xe9 at line 2" in error_of(tmp_path, tok, f)
    f = tmp_path / "sur.json"
    f.write_text('[{"instruction": "a\\ud800", "output": "b"}]')
    assert "row 1: 'instruction' contains an unpaired UTF-16 surrogate" in error_of(
        tmp_path, tok, f
    )


def test_bad_paths(tmp_path, tok):
    assert (
        error_of(tmp_path, tok, tmp_path / "nope.json")
        == f"--data {tmp_path / 'nope.json'}: no such file or folder"
    )
    (tmp_path / "rows.txt").write_text("x")
    assert "unsupported file type '.txt'" in error_of(tmp_path, tok, tmp_path / "rows.txt")
    (tmp_path / "empty").mkdir()
    assert "folder has no .json/.jsonl/.csv/.parquet files" in error_of(
        tmp_path, tok, tmp_path / "empty"
    )
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert "not a readable Parquet file" in error_of(tmp_path, tok, tmp_path / "bad.parquet")


def test_csv_short_line_and_bad_option_values(tmp_path, tok):
    f = tmp_path / "short.csv"
    f.write_text('instruction,input,output\n"Say hi.","",hi\n"Say bye."\n')
    assert error_of(tmp_path, tok, f).endswith("1 problem: line 3: missing key 'output'")
    ok = write(tmp_path / "ok.json", ROWS)
    assert "--overlength 'cut': choose one of truncate, drop, error" in error_of(
        tmp_path, tok, ok, overlength="cut"
    )
    assert "--val_set_size -1" in error_of(tmp_path, tok, ok, val_set_size=-1)


def test_a_one_megabyte_row(tmp_path, tok):
    big = "The quick brown fox jumps over the lazy dog. " * 23000  # ~1 MB
    mid = big[:100_000]
    f = write(
        tmp_path / "big.jsonl",
        [
            {"instruction": big, "input": "", "output": "Short answer."},
            {"instruction": "Short.", "input": mid, "output": mid},
        ],
    )
    got = prep(tmp_path, tok, f, val_set_size=0, cutoff_len=128)
    assert list(got.train["length"]) == [len(x) for x in list(got.train["input_ids"])]
    assert all(n <= 128 for n in list(got.train["length"])) and got.audit.truncated_rows == 2
    assert all(
        x[-1] == tok.eos_token_id and y[-1] == tok.eos_token_id
        for x, y in zip(list(got.train["input_ids"]), list(got.train["labels"]), strict=True)
    )
    assert got.audit.length_percentiles["max"] > 200_000


def test_overlength_error_lists_rows(tmp_path, tok):
    long = "The quick brown fox jumps over the lazy dog. " * 30
    f = write(
        tmp_path / "long.jsonl",
        [
            ROWS[0],
            {"instruction": "a", "output": long},
            ROWS[1],
            {"instruction": long, "output": "b"},
        ],
    )
    msg = error_of(tmp_path, tok, f, overlength="error", cutoff_len=128)
    assert (
        msg.startswith(f"{f}: 2 problems: line 2: ")
        and "tokens, more than --cutoff_len 128; line 4: " in msg
    )
    assert "hint: --overlength truncate cuts long rows, --overlength drop skips them" in msg
    got = prep(tmp_path, tok, f, overlength="drop", cutoff_len=128, val_set_size=0)
    assert list(got.train["row"]) == [0, 2] and got.audit.skipped == {"over --cutoff_len": 2}
    only_long = write(tmp_path / "only.json", [{"instruction": "a", "output": long}])
    assert error_of(tmp_path, tok, only_long, overlength="drop", cutoff_len=128).endswith(
        "no rows left to train on (all skipped: 1 over --cutoff_len)"
    )


# --- split and cache -------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete(tmp_path, tok):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": str(i)} for i in range(50)]
    f = write(tmp_path / "n.json", rows)
    a = prep(tmp_path, tok, f, val_set_size=10, seed=1)
    b = prep(tmp_path, tok, f, val_set_size=10, seed=1)
    c = prep(tmp_path, tok, f, val_set_size=10, seed=2)
    assert len(a.val) == 10 and len(a.train) == 40
    assert sorted(list(a.train["row"]) + list(a.val["row"])) == list(range(50))
    assert list(a.val["row"]) == list(b.val["row"]) != list(c.val["row"])


def test_small_data_shrinks_val_with_a_warning(tmp_path, tok, capsys):
    got = prep(tmp_path, tok, write(tmp_path / "s.json", ROWS))  # default 2000
    assert len(got.val) == 1 and len(got.train) == 5
    err = capsys.readouterr().err
    assert "--val_set_size 2000 is more than 20% of the 6 usable rows; using 1" in err
    assert prep(tmp_path, tok, write(tmp_path / "s.json", ROWS), val_set_size=0).val is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), val=st.integers(0, 60), seed=st.integers(0, 3))
def test_split_is_a_seeded_partition(n, val, seed):
    train, val_idx = split_indices(n, val, seed)
    assert sorted(np.concatenate([train, val_idx]).tolist()) == list(range(n))
    assert not set(train.tolist()) & set(val_idx.tolist())
    assert len(val_idx) == min(val, n)
    assert list(train) == sorted(train) and list(val_idx) == sorted(val_idx)
    again = split_indices(n, val, seed)
    assert (again[0] == train).all() and (again[1] == val_idx).all()


def test_cache_hit_and_invalidation(tmp_path, tok):
    f = write(tmp_path / "c.json", ROWS)
    first = prep(tmp_path, tok, f, val_set_size=0)
    entry = tmp_path / "cache" / first.fingerprint
    assert (entry / "train.arrow").is_file() and (entry / "audit.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp left
    stamp = (entry / "train.arrow").stat().st_mtime_ns
    again = prep(tmp_path, tok, f, val_set_size=0)
    assert again.fingerprint == first.fingerprint
    assert again.train.cache_files[0]["filename"] == str(entry / "train.arrow")
    assert (entry / "train.arrow").stat().st_mtime_ns == stamp
    assert list(again.train["input_ids"]) == list(first.train["input_ids"])
    assert prep(tmp_path, tok, f, val_set_size=0, cutoff_len=128).fingerprint != first.fingerprint
    assert (
        prep(tmp_path, tok, f, val_set_size=0, train_on_inputs=True).fingerprint
        != first.fingerprint
    )
    assert (
        prep(tmp_path, tok, f, val_set_size=0, template="alpaca_short").fingerprint
        != first.fingerprint
    )
    write(f, ROWS[:-1])
    assert prep(tmp_path, tok, f, val_set_size=0).fingerprint != first.fingerprint


# --- the real data, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    from lora_alpaca.models import BaseModelRef, load_tokenizer

    return load_tokenizer(BaseModelRef("SmolLM2-135M-Instruct", str(smollm2)))


def flat(ds, column: str) -> np.ndarray:
    """A column's values (lists flattened) as numpy, straight from Arrow: fast on 50K rows."""
    import pyarrow.compute as pc

    col = ds.data.column(column).combine_chunks()
    return np.asarray(pc.list_flatten(col) if column != "length" else col)


@pytest.mark.slow
def test_real_alpaca_data_empty_outputs_error_lists_them(tmp_path, smol_tok, alpaca_json):
    msg = error_of(tmp_path, smol_tok, alpaca_json, empty_outputs="error")
    assert msg.startswith(f"{alpaca_json}: 28 problems: row 285: empty output; ")
    assert "hint: --empty_outputs skip drops rows with an empty output" in msg


@pytest.mark.slow
def test_real_alpaca_data_end_to_end(tmp_path, smol_tok, alpaca_json):
    alpaca = load_template("alpaca")
    got = prep(tmp_path, smol_tok, alpaca_json, empty_outputs="skip")
    a = got.audit
    assert a.rows_read == 52002 and a.skipped == {"empty output": 28} and a.rows_kept == 51974
    assert len(got.train) == 49974 and len(got.val) == 2000
    rows = list(got.train["row"]) + list(got.val["row"])
    assert len(set(rows)) == 51974
    source = json.loads(alpaca_json.read_text())
    eos = smol_tok.eos_token_id
    rng = np.random.default_rng(0)
    for k in rng.choice(len(got.train), 40, replace=False).tolist():
        ex = got.train[k]
        r = source[ex["row"]]
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[-1] == labels[-1] == eos and len(ids) == ex["length"] <= 256
        p = plain(smol_tok, alpaca.build_prompt(r["instruction"], r["input"]))
        full = p + plain(smol_tok, r["output"]) + [eos]
        if len(full) <= 256:  # checked against the plain transformers API
            assert ids == full and labels == [-100] * len(p) + full[len(p) :]
        else:
            assert len(ids) <= 256 and ids != full
    # the audit agrees with the arrays it summarises
    lengths = np.concatenate([flat(got.train, "length"), flat(got.val, "length")])
    labels = np.concatenate([flat(got.train, "labels"), flat(got.val, "labels")])
    assert a.total_tokens == lengths.sum() == len(labels)
    assert a.supervised_tokens == (labels != -100).sum()
    # length statistics agree with an independent tokenization of a 2,000-row sample
    sample = [
        source[i]
        for i in rng.choice(len(source), 2000, replace=False)
        if source[i]["output"].strip()
    ]
    prompts = [alpaca.build_prompt(r["instruction"], r["input"]) for r in sample]
    full = np.array(
        [
            len(p) + len(o) + 1
            for p, o in zip(
                smol_tok(prompts, add_special_tokens=False)["input_ids"],
                smol_tok([r["output"] for r in sample], add_special_tokens=False)["input_ids"],
                strict=True,
            )
        ]
    )
    assert (
        abs(np.percentile(full, 50) - a.length_percentiles["p50"])
        <= 0.1 * a.length_percentiles["p50"]
    )
    assert abs((full > 256).mean() - a.truncated_share) < 0.015
    assert (
        a.length_percentiles["p50"]
        <= a.length_percentiles["p90"]
        <= a.length_percentiles["p99"]
        <= a.length_percentiles["max"]
    )
    assert (
        a.recommended_cutoff_len >= a.length_percentiles["p99"]
        and a.recommended_cutoff_len % 32 == 0
    )
    assert a.zero_supervised_rows == 0 and len(a.examples) == 2
    cached = prep(tmp_path, smol_tok, alpaca_json, empty_outputs="skip")
    assert cached.fingerprint == got.fingerprint and cached.audit == got.audit


def test_unwritable_cache_folder_still_prepares(tmp_path, tok, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    got = prep(tmp_path, tok, write(tmp_path / "ok.json", ROWS), val_set_size=0)
    assert len(got.train) == len(ROWS)
    assert "could not cache the tokenized data" in capsys.readouterr().err
