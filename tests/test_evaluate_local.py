"""`evaluate.py answers` with local systems on the tiny model: the held-out loss of reference
answers (checked against a loss computed here with transformers' own masked loss), the same
weights as a GGUF file through the project's GGUF loading, and the loss in the judge report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script
from test_evaluate_judge import judge_server  # noqa: F401 (the scripted judge fixture)

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet, exercise regularly and sleep well."},
    {"instruction": "Classify the sentiment of the review.", "input": "The quick brown fox.",
     "output": "positive"},
    {"instruction": "What is the capital of France?", "input": ""},  # no reference: not scored
]  # fmt: skip


def expected_loss(model_dir, row) -> float:
    """Mean loss of the answer tokens (+ EOS) after the alpaca prompt, by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.prompts import load_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok(load_template("alpaca").build_prompt(row["instruction"], row["input"] or None))
    answer = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = prompt["input_ids"] + answer
    labels = [-100] * len(prompt["input_ids"]) + answer
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    return float(out.loss)


def answers(*args, env=None):
    r = run_script("evaluate.py", "answers", "--max_new_tokens", 4, *args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_held_out_loss_local_and_gguf_and_in_the_report(tiny_model, tmp_path, judge_server):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.export.gguf import write_gguf
    from lora_alpaca.prompts import load_template

    with_refs = tmp_path / "set.json"
    with_refs.write_text(json.dumps(ROWS))
    folder_out = tmp_path / "folder.json"
    answers("--eval_set", with_refs, "--base_model", tiny_model, "--output_file", folder_out)
    got = json.loads(folder_out.read_text())
    assert [("reference_loss" in g) for g in got] == [True, True, False]
    for g, row in zip(got[:2], ROWS[:2], strict=True):
        assert g["reference_loss"] == pytest.approx(expected_loss(tiny_model, row), rel=1e-4)
        n_answer = len(AutoTokenizer.from_pretrained(tiny_model)(row["output"])["input_ids"])
        assert g["reference_tokens"] >= n_answer  # answer tokens + EOS (BOS is not scored)

    # The same weights as GGUF (f16), read back through the project's GGUF loading
    # (default_model.convert_gguf); the references come only from --reference_outputs now.
    gguf = tmp_path / "tiny-f16.gguf"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    write_gguf(model, AutoTokenizer.from_pretrained(tiny_model), load_template("alpaca"), gguf,
               "f16", "tiny")  # fmt: skip
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["input"]})
                            + "\n" for r in ROWS))  # fmt: skip
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"instruction": g["instruction"], "output": row["output"],
                                 "generator": "ref"} for g, row in zip(got[:2], ROWS[:2], strict=True)]))  # fmt: skip
    gguf_out = tmp_path / "gguf.json"
    answers("--eval_set", bare, "--base_model", gguf, "--reference_outputs", refs,
            "--output_file", gguf_out, env={"LORA_ALPACA_CACHE": str(tmp_path / "cache")})  # fmt: skip
    got_gguf = json.loads(gguf_out.read_text())
    assert got_gguf[0]["generator"] == "base-tiny-f16.gguf"
    assert [("reference_loss" in g) for g in got_gguf] == [True, True, False]
    for g, f in zip(got_gguf[:2], got[:2], strict=True):  # f16 weights: close, not equal
        assert g["reference_tokens"] == f["reference_tokens"]
        assert g["reference_loss"] == pytest.approx(f["reference_loss"], rel=1e-2)

    out_dir = tmp_path / "eval"
    r = run_script("evaluate.py", "judge", "--model_outputs", gguf_out, "--reference_outputs",
                   folder_out, "--output_dir", out_dir, "--api_base", judge_server["url"],
                   "--judge_model", "logprob-judge", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out_dir / "results.json").read_text())
    loss = results["held_out_loss"]
    assert loss["model"]["rows"] == loss["reference"]["rows"] == 2
    assert loss["model"]["loss"] == pytest.approx(loss["reference"]["loss"], rel=1e-2)
    report = (out_dir / "report.md").read_text()
    row = "| held-out loss of the reference answers (per token) | "
    assert f"{row}{loss['model']['loss']:.3f} (2 rows) | {loss['reference']['loss']:.3f}" in report
