"""Shipping: the LoRA adapter GGUF (llama.cpp's format), the Ollama Modelfile, --bundle."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from conftest import run_script

from lora_alpaca.chat_template import build_renderer
from lora_alpaca.export.gguf import _permute_qk
from lora_alpaca.export.gguf_lora import _unpermute_qk
from lora_alpaca.export.modelfile import (
    go_template,
    measure,
    modelfile,
    render_pieces,
    stop_parameters,
)
from lora_alpaca.export.template_parity import CONVERSATIONS
from lora_alpaca.prompts import load_template


def test_bundle_writes_everything_and_checks_it(ship_bundle):
    out, stdout, _ = ship_bundle
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "model-f16.gguf", "base-f16.gguf"} <= names
    assert {"adapter-f16.gguf", "Modelfile", "Modelfile.adapter", "README.md"} <= names
    assert "parity PASS gguf lora f16 on base f16" in stdout
    report = json.loads((out / "parity.json").read_text())
    lora = next(s for s in report["checks"] if s["target"].startswith("gguf lora"))
    assert lora["passed"] and lora["max_abs_logit_diff"] < 0.05
    card = (out / "README.md").read_text()
    assert "61.2%" in card and "66.7%" in card  # the win rates from --eval_results
    assert "adapter-f16.gguf" in card and "fingerprint" in card
    adapter_mf = (out / "Modelfile.adapter").read_text()
    assert "FROM ./base-f16.gguf\nADAPTER ./adapter-f16.gguf\n" in adapter_mf
    assert (out / "Modelfile").read_text().splitlines()[1] == "FROM ./model-f16.gguf"


def test_adapter_gguf_has_llama_cpp_names_and_metadata(ship_bundle):
    out, _, adapter = ship_bundle
    reader = gguf.GGUFReader(str(out / "adapter-f16.gguf"))

    def value(key):
        f = reader.fields[key]
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0]

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    assert value("general.architecture") == "llama"
    assert float(value("adapter.lora.alpha")) == 8.0  # make_adapter: r=4, alpha=2r
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    # ggml order (reversed numpy): lora_a [in, r], lora_b [r, out]; k has 2 kv heads * 16
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4]
    assert shapes["blk.1.attn_k.weight.lora_b"] == [4, 32]
    assert len(shapes) == 2 * 2 * 4  # 2 layers x 4 modules x (a, b)


def test_qk_unpermute_inverts_the_writer():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    assert np.array_equal(_unpermute_qk(_permute_qk(w, 4), 4), w)


def test_bad_flags_are_one_line(ship_bundle, tmp_path):
    from lora_alpaca.errors import UsageError
    from lora_alpaca.export.app import ExportConfig
    from lora_alpaca.export.merge import bundle_plan

    with pytest.raises(UsageError, match="--eval_results: goes with --bundle"):
        bundle_plan(ExportConfig(eval_results=str(tmp_path)), [])
    with pytest.raises(UsageError, match="drop --gguf_only"):
        bundle_plan(ExportConfig(bundle=True, gguf_only=True), ["f16"])
    _, _, adapter = ship_bundle
    r = run_script(
        "export_hf_checkpoint.py",
        *("--lora_weights", adapter, "--output_dir", tmp_path / "y", "--bundle"),
        *("--eval_results", tmp_path),
    )
    assert r.returncode == 2 and "no results.json or human_results.json" in r.stderr
    assert not (tmp_path / "y").exists()


def test_bundle_default_plan():
    """--bundle with no --gguf / --gguf_lora: the files hobbyists download (f16 and q4_k_m
    merged, the f16 LoRA GGUF); a --gguf list the user gives wins; without --bundle nothing
    is added."""
    from lora_alpaca.export.app import ExportConfig
    from lora_alpaca.export.merge import bundle_plan

    assert bundle_plan(ExportConfig(bundle=True), []) == (["f16", "q4_k_m"], "f16")
    assert bundle_plan(ExportConfig(bundle=True), ["q8_0"]) == (["q8_0"], "f16")
    assert bundle_plan(ExportConfig(bundle=True, gguf_lora="q8_0"), []) == (
        ["f16", "q4_k_m"],
        "q8_0",
    )
    assert bundle_plan(ExportConfig(), []) == ([], None)


@pytest.mark.parametrize("spec", ["alpaca", "chatml"])
def test_modelfile_template_reproduces_the_renderer(tiny_model, spec):
    """The pieces the Go TEMPLATE is built from render every parity conversation as the
    training renderer does; stops and the end-of-turn token are PARAMETER stop lines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if spec == "chatml":
        tok.chat_template = (
            "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
        )
        renderer = build_renderer(tok, "base", load_template("alpaca"))
    else:
        renderer = build_renderer(tok, "alpaca", load_template("alpaca"))
    pieces = measure(renderer)
    assert pieces is not None
    for msgs in CONVERSATIONS:
        assert render_pieces(pieces, msgs) == renderer.prompt_text(msgs)
    text = modelfile(renderer, "model-q8_0.gguf")
    template = go_template(pieces)
    assert f'TEMPLATE """{template}"""' in text
    for piece in (pieces.first, pieces.to_assistant, pieces.to_user):
        assert "{{ " + json.dumps(piece) + " }}" in template
    stops = stop_parameters(text)
    assert stops == list(renderer.stop_strings) and "</s>" in stops
    if spec == "alpaca":  # raw text in quotes: Ollama's parser decodes no escapes
        assert "### Instruction:" in stops and 'PARAMETER stop "\n### "\n' in text


def test_modelfile_refuses_a_template_it_cannot_reproduce(tiny_model):
    """A template that numbers turns cannot be split into fixed pieces: no TEMPLATE line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}{{ loop.index|string + m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    renderer = build_renderer(tok, "base", load_template("alpaca"))
    assert measure(renderer) is None
    text = modelfile(renderer, "model-f16.gguf")
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "") and "No TEMPLATE" in text
