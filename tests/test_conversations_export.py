"""Conversations end to end on a tiny ChatML model: finetune.py on ShareGPT rows with no
format flag, the adapter folder's tokenizer carries the training template, and the export
(merged folder + GGUF) passes the template-parity check (training renderer, tokenizer
apply_chat_template, GGUF template read back and rendered with jinja2: identical ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import export, finetune, run_script
from test_conversations import CHATML
from tiny import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_alpaca.chat_template import renderer_from_manifest
from lora_alpaca.export.template_parity import gguf_chat_template, template_parity

WORDS = ["apple", "river", "stone", "cloud", "violet", "candle", "harbor", "meadow"]


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory) -> Path:
    d = make_tiny_model(tmp_path_factory.mktemp("tiny-chatml"))
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(d)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def sharegpt_rows(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append(
            {
                "conversations": [
                    {"from": "human", "value": f"Say {a}."},
                    {"from": "gpt", "value": a},
                    {"from": "human", "value": f"Now say {b}."},
                    {"from": "gpt", "value": f"{b} {i}"},
                ]
            }
        )
    path.write_text(json.dumps(rows))
    return path


def test_chat_adapter_export_template_parity(chatml_model, tmp_path):
    data = sharegpt_rows(tmp_path / "chat.json")
    adapter = tmp_path / "adapter"
    common = ["--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "2"]
    r = finetune("--base_model", chatml_model, "--data", data, "--output_dir", adapter, *common,
                 "--val_set_size", "4", "--cutoff_len", "96", "--dtype", "fp32")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "conversations: sharegpt rows, chat template base" in r.stderr
    manifest = json.loads((adapter / "lora_alpaca.json").read_text())
    assert manifest["data_format"] == "sharegpt"
    assert manifest["chat_template"]["jinja"] == CHATML
    assert AutoTokenizer.from_pretrained(adapter).chat_template == CHATML

    out = tmp_path / "merged"
    r = export(adapter, out, "--dtype", "fp32", "--gguf", "q8_0", "--parity_prompts", "2")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "parity PASS chat template (training renderer / tokenizer / GGUF)" in r.stdout, r.stdout
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    source, eog = gguf_chat_template(out / "model-q8_0.gguf")
    assert source == CHATML
    renderer = renderer_from_manifest(manifest, AutoTokenizer.from_pretrained(adapter))
    assert set(renderer.eog_token_ids) <= eog
    # The check fails when an artifact's template differs (it is not a rubber stamp).
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML.replace("You are a helpful assistant.", "Be nice.")
    tok.save_pretrained(tmp_path / "tampered")
    bad = template_parity(renderer, tmp_path / "tampered", [])
    assert not bad["passed"] and bad["failures"]

    # generate.py --input_file rows with messages are rendered by the same renderer.
    rows = tmp_path / "ask.jsonl"
    rows.write_text(
        json.dumps({"id": 1, "messages": [{"role": "user", "content": "Say apple."}]})
        + "\n"
        + json.dumps({"instruction": "Say stone."})
        + "\n"
    )
    answers = tmp_path / "answers.jsonl"
    r = run_script(
        "generate.py",
        "--lora_weights",
        adapter,
        "--input_file",
        rows,
        "--output_file",
        answers,
        "--max_new_tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert got[0]["id"] == 1 and "messages" in got[0] and "response" in got[0]
    assert got[1]["instruction"] == "Say stone."
