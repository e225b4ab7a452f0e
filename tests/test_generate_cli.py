"""generate.py end to end: one prompt and a file of prompts, as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch
from adapters import make_adapter
from conftest import run_cli, run_script

from lora_alpaca.generate.engine import DecodingSettings
from lora_alpaca.generate.loading import LoadRequest, load_generator

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("cli-adapter") / "out")


@pytest.fixture(scope="module")
def in_process(adapter_dir):
    torch.set_num_threads(1)
    return load_generator(LoadRequest(lora_weights=str(adapter_dir), dtype="fp32")).generator


def test_one_prompt_prints_the_response(adapter_dir, in_process):
    r = run_script(
        "generate.py",
        "--lora_weights",
        adapter_dir,
        "--prompt",
        "Give three tips for staying healthy.",
        "--max_new_tokens",
        "12",
        "--dtype",
        "fp32",
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    want = in_process.generate(
        [in_process.prompt_for("Give three tips for staying healthy.")],
        DecodingSettings(max_new_tokens=12),
    )[0]
    assert r.stdout.strip() == want.text
    assert f"ended by {want.finish_reason} after {want.new_tokens} tokens" in r.stderr


def test_file_of_prompts_in_batches(adapter_dir, in_process, alpaca_json, tmp_path):
    alpaca_rows = json.loads(alpaca_json.read_text())[:5]  # real rows, with and without input
    rows = alpaca_rows + [{"instruction": "Name a primary color."}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, report = tmp_path / "answers.jsonl", tmp_path / "probe.md"
    r = run_script(
        "generate.py",
        "--lora_weights",
        adapter_dir,
        "--input_file",
        src,
        "--output_file",
        out,
        "--max_new_tokens",
        "10",
        "--batch_size",
        "4",
        "--dtype",
        "fp32",
        "--probe_report",
        report,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # stderr is a pipe here, so the live bar is off (first-hour change); the summary line is there.
    assert "generating" not in r.stderr and "wrote 6 rows" in r.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["instruction"] for a in answers] == [
        x["instruction"] for x in rows
    ]  # input order kept
    for a, row in zip(answers, rows, strict=True):
        assert a["finish_reason"] in ("eos", "stop_string", "length")
        one = in_process.generate(
            [in_process.prompt_for(row["instruction"], row.get("input"))],
            DecodingSettings(max_new_tokens=10),
        )[0]
        assert (a["response"], a["finish_reason"], a["new_tokens"]) == (
            one.text,
            one.finish_reason,
            one.new_tokens,
        )
    assert "| prompts | 6 |" in report.read_text()


def run_in_process(capsys, *argv: str) -> tuple[int, str]:
    r = run_cli("generate", *argv)
    return r.returncode, r.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input_file", "x.jsonl"], "--input_file and --output_file go together"),
        (["--prompt", "hi", "--mode", "sample", "--temperature", "0"], "--temperature"),
        (["--load_8bit", "--quantization", "4bit", "--prompt", "x"], "--load_8bit conflicts"),
        (["--input", "context only"], "--input needs --prompt"),
        (["--lora_weights", "/no/such/adapter"], "--lora_weights: no such folder"),
        (
            ["--input_file", "/no/such.jsonl", "--output_file", "o.jsonl"],
            "--input_file: no such file",
        ),
    ],
)
def test_bad_flags_fail_in_one_line(capsys, argv, message):
    code, err = run_in_process(capsys, *argv)
    assert code == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_row_names_the_line_and_writes_nothing(capsys, tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    out = tmp_path / "out.jsonl"
    code, err = run_in_process(capsys, "--input_file", src, "--output_file", out)
    assert code == 2 and f"{src} line 2" in err and "instruction" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
