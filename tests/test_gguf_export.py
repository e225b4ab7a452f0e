"""GGUF writer: f16 / q8_0 files round-trip through transformers' GGUF reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
import torch
from adapters import make_adapter
from tiny import make_tiny_model

from lora_alpaca.errors import UsageError
from lora_alpaca.export.gguf import (
    chat_template_for,
    check_supported,
    load_gguf_model,
    tokenizer_metadata,
    write_gguf,
)
from lora_alpaca.export.parity import greedy
from lora_alpaca.prompts import load_template, parse_template


def merged_tiny(base: Path, tmp: Path):
    """A tiny model with a LoRA merged in (random lora_B, so the merge changed weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(
        base, tmp / "ad", target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return merged, AutoTokenizer.from_pretrained(adapter)


@pytest.fixture(scope="module")
def merged_llama(tiny_model, tmp_path_factory):
    return merged_tiny(tiny_model, tmp_path_factory.mktemp("m"))


PROMPT = load_template("alpaca").build_prompt("Give three tips for staying healthy.")


@pytest.mark.parametrize(
    "qtype, atol, file_type",
    [("f16", 2e-2, gguf.GGMLQuantizationType.F16), ("q8_0", 2e-1, gguf.GGMLQuantizationType.Q8_0)],
)
def test_round_trip_through_transformers_reader(merged_llama, tmp_path, qtype, atol, file_type):
    model, tok = merged_llama
    path = write_gguf(
        model, tok, load_template("alpaca"), tmp_path / f"m-{qtype}.gguf", qtype, "tiny"
    )
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert (
        types["blk.0.attn_q.weight"] == file_type
        and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    )
    assert "output.weight" in types  # untied model: its own output projection
    back, back_tok = load_gguf_model(path)
    ids = tok(PROMPT)["input_ids"]
    assert back_tok(PROMPT)["input_ids"] == ids
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits
        got = back(input_ids=torch.tensor([ids])).logits
    drift = float((got - want).abs().max())
    assert drift < atol
    ref = greedy(model, ids, 12, tok.eos_token_id)
    if qtype == "f16":
        assert greedy(back, ids, 12, tok.eos_token_id) == ref
        return
    # q8_0 moves logits by up to `drift`; a random tiny model (whose BPE vocabulary, trained
    # on the spot, can differ between machines) has near-ties that such noise may flip, as
    # seen in CI. Teacher-force prompt + reference continuation and require the same top-1
    # wherever the reference's top-2 margin exceeds twice the drift (the parity check's rule).
    seq = torch.tensor([ids + ref])
    with torch.no_grad():
        lw = model(input_ids=seq).logits[0, :-1]
        lg = back(input_ids=seq).logits[0, :-1]
    drift = float((lg - lw).abs().max())
    top2 = lw.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * drift
    assert clear.sum() >= 5, (int(clear.sum()), len(clear), drift)
    assert torch.equal(lg.argmax(-1)[clear], lw.argmax(-1)[clear])


def test_qk_permutation_is_undone_exactly(merged_llama, tmp_path):
    """llama.cpp's rotary row order for q and k (GQA: 4 query, 2 key/value heads here)."""
    model, tok = merged_llama
    path = write_gguf(model, tok, load_template("alpaca"), tmp_path / "m.gguf", "f16", "tiny")
    back, _ = load_gguf_model(path)
    for proj in ("q_proj", "k_proj", "v_proj"):
        want = getattr(model.model.layers[1].self_attn, proj).weight
        got = getattr(back.model.layers[1].self_attn, proj).weight
        torch.testing.assert_close(got, want.half().float(), atol=0, rtol=0)
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.1.attn_q.weight"]
    stored = torch.from_numpy(raw.data.astype("float32")).reshape(
        model.model.layers[1].self_attn.q_proj.weight.shape
    )
    assert not torch.equal(
        stored, model.model.layers[1].self_attn.q_proj.weight.half().float()
    )  # permuted on disk


def test_gguf_as_base_model_is_converted_with_progress_lines(merged_llama, tmp_path, capsys):
    """--base_model file.gguf: converted once into a transformers folder, saying so."""
    from transformers import AutoModelForCausalLM

    from lora_alpaca.default_model import convert_gguf

    model, tok = merged_llama
    path = write_gguf(model, tok, load_template("alpaca"), tmp_path / "m.gguf", "f16", "tiny")
    capsys.readouterr()
    out = convert_gguf(path, tmp_path / "hf")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[lora_alpaca] converting m.gguf (") and err[0].endswith(" ..."), err
    assert " MB) to a transformers checkpoint in " in err[0], err
    assert re.fullmatch(r"\[lora_alpaca\] converted in \d+\.\d s", err[-1]), err
    assert convert_gguf(path, out) == out and capsys.readouterr().err == ""  # once
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = model.model.layers[1].self_attn.q_proj.weight.half().float()
    torch.testing.assert_close(plain.model.layers[1].self_attn.q_proj.weight, want, atol=0, rtol=0)


def test_metadata_llama_runtime_needs(merged_llama, tmp_path):
    model, tok = merged_llama
    path = write_gguf(model, tok, load_template("alpaca"), tmp_path / "m.gguf", "q8_0", "tiny")
    f = gguf.GGUFReader(path).fields
    value = lambda k: f[k].contents()  # noqa: E731
    cfg = model.config
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == cfg.num_hidden_layers
    assert value("llama.attention.head_count") == 4 and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert value("llama.rope.dimension_count") == 16
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert (
        len(value("tokenizer.ggml.tokens"))
        == cfg.vocab_size
        == len(value("tokenizer.ggml.token_type"))
    )
    assert len(value("tokenizer.ggml.merges")) > 100
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert value("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    types = value("tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert json.loads(value("lora_alpaca.prompt_template"))["response_split"] == "### Response:"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    merged, tok = merged_tiny(make_tiny_model(tmp_path / "tied", tie=True), tmp_path)
    path = write_gguf(merged, tok, load_template("alpaca"), tmp_path / "t.gguf", "f16", "tied")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back, _ = load_gguf_model(path)
    assert back.config.tie_word_embeddings
    ids = tok(PROMPT)["input_ids"]
    assert greedy(back, ids, 12, tok.eos_token_id) == greedy(merged, ids, 12, tok.eos_token_id)


def test_mistral_runs_as_llama(tmp_path):
    merged, tok = merged_tiny(make_tiny_model(tmp_path / "mistral", arch="mistral"), tmp_path)
    path = write_gguf(
        merged, tok, load_template("alpaca"), tmp_path / "m.gguf", "f16", "tiny-mistral"
    )
    back, _ = load_gguf_model(path)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        diff = (
            (
                back(input_ids=torch.tensor([ids])).logits
                - merged(input_ids=torch.tensor([ids])).logits
            )
            .abs()
            .max()
        )
    assert diff < 2e-2


def test_chat_template_renders_the_adapter_prompt_exactly(merged_llama, tmp_path):
    """Template text with quotes, backslashes and literal braces survives into Jinja."""
    model, tok = merged_llama
    odd = parse_template(
        {
            "description": "odd",
            "prompt_input": "{instruction} / {input}",
            "prompt_no_input": 'Say "hi" \\ {{not a slot}}\n>> {instruction}\n<< ',
            "response_split": "<<",
        },
        "odd",
        "test",
    )
    for template in (load_template("alpaca"), load_template("vigogne"), odd):
        path = write_gguf(model, tok, template, tmp_path / f"{template.name}.gguf", "f16", "tiny")
        _, back_tok = load_gguf_model(path)
        rendered = back_tok.apply_chat_template(
            [
                {"role": "system", "content": "ignored"},
                {"role": "user", "content": "Name 2 {colours}."},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert rendered == template.build_prompt("Name 2 {colours}.")
        assert (
            chat_template_for(template)
            in gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
        )


def test_unsupported_architecture_and_tokenizer_are_clear_errors(tmp_path, merged_llama):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    qwen = make_tiny_model(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(
        UsageError, match=r"architecture .qwen2. is not supported.*supported: llama, mistral"
    ):
        check_supported(AutoConfig.from_pretrained(qwen))
    # a sentencepiece-style vocabulary (byte fallback) is refused, not written wrong
    spm = Tokenizer(
        models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", eos_token="<unk>")
    with pytest.raises(UsageError, match="byte fallback"):
        tokenizer_metadata(fast, 2)
