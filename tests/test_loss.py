"""The chunked loss equals the plain full-logits loss, in value and in LoRA gradients."""

from __future__ import annotations

import pytest
import torch
from test_packing import assert_same, lora_model, loss_and_grads, make_rows
from tiny import make_tiny_model

from lora_alpaca.data.packing import count_supervised, pack_rows, pad_rows
from lora_alpaca.train.loss import causal_lm_loss_sum

LENGTHS = [81, 17, 60, 29]


@pytest.fixture(scope="module")
def model(tiny_model):
    return lora_model(tiny_model, "sdpa")


@pytest.mark.parametrize("chunk_size", [1, 8, 64, 100_000])
def test_chunked_equals_plain_packed(model, chunk_size):
    rows = make_rows(model.config.vocab_size, LENGTHS)
    batch = pack_rows(rows)
    n = count_supervised(rows)
    assert (
        n % 8 != 0 and n % 64 != 0 and n > 64
    )  # a chunk size that does not divide, and one that splits
    assert_same(
        loss_and_grads(model, [batch], chunk_size=chunk_size),
        loss_and_grads(model, [batch], chunk_size=None),
    )


def test_chunked_equals_plain_padded(model):
    rows = make_rows(model.config.vocab_size, LENGTHS, seed=5)
    batch = pad_rows(rows, pad_token_id=0)
    assert_same(
        loss_and_grads(model, [batch], chunk_size=13),
        loss_and_grads(model, [batch], chunk_size=None),
    )


def test_plain_loss_matches_transformers_own_loss(model):
    """Anchor to an independent implementation: HF's mean loss x count == our sum."""
    rows = make_rows(model.config.vocab_size, LENGTHS, seed=6)
    batch = pad_rows(rows, pad_token_id=0)
    with torch.no_grad():
        ours, n = causal_lm_loss_sum(model, batch, chunk_size=32)
        hf = model(**batch, use_cache=False).loss
    assert ours.item() == pytest.approx(hf.item() * n, rel=1e-5)


def test_frozen_head_takes_the_fused_path_and_a_trainable_head_the_checkpointed_one(model):
    """The usual LoRA run (frozen lm_head) never calls lm_head: dL/dh is made in forward,
    no logits are recomputed. A trained head (e.g. modules_to_save) is called (forward +
    recompute) and still gets the exact plain-loss gradient, its own included."""
    head = model.get_base_model().lm_head
    calls = []
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    batch = pack_rows(make_rows(model.config.vocab_size, LENGTHS, seed=9))
    try:
        loss_and_grads(model, [batch], chunk_size=32)
        assert calls == []
        head.weight.requires_grad_(True)
        chunked = loss_and_grads(model, [batch], chunk_size=32)
        assert len(calls) > 1  # every chunk's forward, and the recomputes in backward
        plain = loss_and_grads(model, [batch], chunk_size=None)
        assert "base_model.model.lm_head.weight" in chunked[2]
        assert_same(chunked, plain)
    finally:
        head.weight.requires_grad_(False)
        head.weight.grad = None
        hook.remove()


def test_tied_embeddings(tmp_path):
    path = make_tiny_model(tmp_path / "tied", tie=True)
    model = lora_model(path, "sdpa")
    assert model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight
    batch = pack_rows(make_rows(model.config.vocab_size, LENGTHS, seed=7))
    assert_same(
        loss_and_grads(model, [batch], chunk_size=10),
        loss_and_grads(model, [batch], chunk_size=None),
    )


def test_bf16_autocast_and_bf16_base_weights(tiny_model):
    """CPU fast path: bf16 frozen base, fp32 LoRA, autocast bf16. Chunked and plain agree to
    bf16 precision, and both stay close to the fp32 loss."""
    model = lora_model(tiny_model, "sdpa")
    batch = pack_rows(make_rows(model.config.vocab_size, LENGTHS, seed=8))
    with torch.no_grad():
        fp32, _ = causal_lm_loss_sum(model, batch, chunk_size=None)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_grads(model, [batch], chunk_size=16)
        plain = loss_and_grads(model, [batch], chunk_size=None)
    assert all(g.dtype == torch.float32 for g in chunked[2].values())
    assert chunked[0] == pytest.approx(plain[0], rel=1e-2)
    assert chunked[0] == pytest.approx(fp32.item(), rel=2e-2)
    for k in plain[2]:
        cos = torch.nn.functional.cosine_similarity(
            chunked[2][k].flatten(), plain[2][k].flatten(), dim=0
        )
        assert cos > 0.99, k


def test_no_supervised_tokens_gives_zero_and_backward_works(model):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]},
        {"input_ids": [8], "labels": [8]},
    ]
    for chunk_size in (None, 4):
        loss, n = causal_lm_loss_sum(model, pack_rows(rows), chunk_size=chunk_size)
        loss.backward()
        assert n == 0 and loss.item() == 0.0


def test_bad_chunk_size(model):
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss_sum(model, pack_rows(make_rows(100, [5])), chunk_size=0)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_base(tmp_path, quantization):
    """QLoRA / 8-bit bases (bitsandbytes CPU kernels): chunked == plain on the same model."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_alpaca.models import quantization_config

    path = make_tiny_model(tmp_path / "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(quantization, torch.float32),
            device_map={"": "cpu"},
            dtype=torch.float32,
        )
        model = get_peft_model(
            base,
            LoraConfig(
                r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
            ),
        )
        batch = pack_rows(make_rows(model.config.vocab_size, [30, 20, 11], seed=9))
        assert_same(
            loss_and_grads(model, [batch], chunk_size=8),
            loss_and_grads(model, [batch], chunk_size=None),
            rtol=1e-4,
        )
