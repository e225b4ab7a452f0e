"""Packed micro-batches must train exactly like the same rows run one by one (or padded)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import make_tiny_model

from lora_alpaca.constants import IGNORE_INDEX
from lora_alpaca.data.packing import (
    count_supervised,
    pack_rows,
    pad_rows,
)
from lora_alpaca.train.loss import causal_lm_loss_sum
from lora_alpaca.train.packed_attention import row_lengths, use_packed_attention

RTOL = 1e-5


def make_rows(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    """Rows like the data pipeline yields: a masked prompt prefix, then supervised response."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randrange(0, n)  # 0 = train on inputs; n-1 = one supervised token
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def lora_model(path, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    impl = "sdpa" if attn == "packed" else attn
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    if attn == "packed":  # what finetune.py trains with: per-row attention of packed batches
        assert use_packed_attention(base)
    # init_lora_weights=False: random A and B, so gradients reach both (B=0 would zero A's grad).
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    return get_peft_model(base, config)


def loss_and_grads(model, batches: list[dict], chunk_size=None):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in batches:
        loss, n = causal_lm_loss_sum(model, batch, chunk_size=chunk_size)
        loss.backward()
        total += loss.item()
        count += n
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return total, count, grads


def assert_same(a, b, rtol=RTOL):
    (loss_a, n_a, g_a), (loss_b, n_b, g_b) = a, b
    assert n_a == n_b
    assert loss_a == pytest.approx(loss_b, rel=rtol)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        scale = g_b[k].abs().max().item()
        assert scale > 0, f"{k}: zero gradient, test would prove nothing"
        err = (g_a[k] - g_b[k]).abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{k}: max grad diff {err:.3g} vs scale {scale:.3g}"


LENGTHS = [37, 5, 64, 1, 23, 50]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed"])
def test_packed_equals_rows_one_by_one(tiny_model, attn):
    model = lora_model(tiny_model, attn)
    rows = make_rows(model.config.vocab_size, LENGTHS)
    one_by_one = loss_and_grads(model, [pack_rows([r]) for r in rows])
    packed = loss_and_grads(model, [pack_rows(rows)])
    assert_same(packed, one_by_one)
    assert packed[1] == count_supervised(rows) > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed"])
def test_cross_contaminated_pack_differs(tiny_model, attn):
    """Control: the same pack with positions that do NOT restart lets rows see each other,
    and the loss changes, so the equality above really tests the block-diagonal mask."""
    model = lora_model(tiny_model, attn)
    rows = make_rows(model.config.vocab_size, LENGTHS)
    packed = pack_rows(rows)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).unsqueeze(0))
    with torch.no_grad():
        good, _ = causal_lm_loss_sum(model, packed, chunk_size=None)
        bad, _ = causal_lm_loss_sum(model, leaky, chunk_size=None)
    # Random tiny weights mix little context, so the change is small, but 50x the tolerance.
    assert abs(good.item() - bad.item()) > 50 * RTOL * abs(good.item())


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed"])
def test_padded_equals_packed(tiny_model, attn):
    model = lora_model(tiny_model, attn)
    rows = make_rows(model.config.vocab_size, LENGTHS, seed=1)
    packed = loss_and_grads(model, [pack_rows(rows[:3]), pack_rows(rows[3:])])
    padded = loss_and_grads(
        model, [pad_rows(rows[:3], 0), pad_rows(rows[3:], 0, pad_to_multiple_of=16)]
    )
    assert_same(padded, packed)


@pytest.mark.parametrize("arch,tie", [("mistral", False), ("qwen2", True)])
def test_packed_equals_rows_other_architectures(tmp_path, arch, tie):
    path = make_tiny_model(tmp_path / arch, arch=arch, tie=tie)
    model = lora_model(path, "packed")
    rows = make_rows(model.config.vocab_size, [12, 30, 7], seed=2)
    assert_same(
        loss_and_grads(model, [pack_rows(rows)], chunk_size=5),
        loss_and_grads(model, [pack_rows([r]) for r in rows], chunk_size=None),
    )


def test_row_lengths_only_for_packed_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert row_lengths(pos) == [3, 2, 1, 4]
    assert row_lengths(torch.arange(5).unsqueeze(0)) == [5]
    # Not packed rows: left padding (positions 1,1,0,1..), an offset start (a cache), batch 2.
    assert row_lengths(torch.tensor([[1, 1, 0, 1, 2]])) is None
    assert row_lengths(torch.tensor([[3, 4, 5]])) is None
    assert row_lengths(torch.arange(4).repeat(2, 1)) is None


def test_row_boundaries_are_masked():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10], "labels": [10]},
        {"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 13]},
    ]
    packed = pack_rows(rows)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100, 13]]
    assert "attention_mask" not in packed
    # 6, 7, 9, 13: the shifted loss never predicts a row's first token from the row before.
    assert count_supervised(rows) == 4
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == 4

    padded = pad_rows(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (4, 4)
    assert padded["attention_mask"].tolist()[1] == [1, 1, 0, 0]
    assert padded["labels"].tolist()[1] == [-100, 9, -100, -100]
    assert int((padded["labels"][:, 1:] != IGNORE_INDEX).sum()) == 4
    assert padded["attention_mask"].float().mean().item() == pytest.approx(9 / 16)  # real share


def test_bad_rows_are_rejected():
    with pytest.raises(ValueError, match="row 1: input_ids has 2 tokens but labels has 1"):
        pack_rows([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="row 0: empty"):
        pad_rows([{"input_ids": [], "labels": []}], 0)


def test_group_by_length_covers_every_row_once_and_groups_lengths():
    # The live implementation: the training loop's step windows under --group_by_length.
    from lora_alpaca.train.config import FinetuneConfig
    from lora_alpaca.train.loop import epoch_windows

    def group_by_length(lengths, batch_size, seed):
        cfg = FinetuneConfig(batch_size=batch_size, group_by_length=True, seed=seed)
        return epoch_windows(len(lengths), lengths, cfg, epoch=0)

    rng = random.Random(0)
    lengths = [rng.randrange(10, 300) for _ in range(1000)]
    batches = group_by_length(lengths, batch_size=4, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    rand = [list(range(i, min(i + 4, 1000))) for i in range(0, 1000, 4)]
    padded_random = sum(max(lengths[i] for i in b) * len(b) for b in rand)
    assert padded < 0.8 * padded_random
    assert batches != group_by_length(lengths, batch_size=4, seed=4)


def test_causal_bias_gives_masked_fill_scores_and_gradients_bit_for_bit():
    # The per-row attention adds a cached 0/-inf bias instead of masked_fill with a bool
    # mask (faster on CPU); outputs and gradients must be exactly the masked_fill ones.
    from lora_alpaca.train.packed_attention import _causal_bias

    for dtype in (torch.bfloat16, torch.float32):
        scores = torch.randn(1, 3, 3, 37, 37, dtype=dtype)
        grad = torch.randn(1, 3, 3, 37, 37, dtype=dtype)
        future = torch.ones(37, 37, dtype=torch.bool).triu(1)
        a = scores.clone().requires_grad_()
        want = a.masked_fill(future, float("-inf")).softmax(-1)
        want.backward(grad)
        b = scores.clone().requires_grad_()
        got = (b + _causal_bias(37, b.device, dtype)).softmax(-1)
        got.backward(grad)
        assert torch.equal(got, want) and torch.equal(b.grad, a.grad)
        assert (got[..., 0, 1:] == 0).all() and (b.grad[..., 0, 1:] == 0).all()  # future is masked
        assert _causal_bias(600, b.device, dtype).shape == (600, 600)  # grows past the first cache


def test_per_row_attention_in_bf16_matches_fp32_sdpa_with_grouped_heads():
    # SmolLM2's layout (9 query heads sharing 3 kv heads) in bf16, the dtype finetune.py trains
    # in on CPU: outputs and q/k/v gradients against torch's sdpa in fp32, row by row.
    import torch.nn.functional as F

    from lora_alpaca.train.packed_attention import _rows_attention

    lengths = [37, 5, 64, 1, 23]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(lengths), 64, generator=gen) for h in (9, 3, 3))
    grad = torch.randn(1, sum(lengths), 9, 64, generator=gen)
    want, start = [], 0
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    for n in lengths:
        rq, rk, rv = (t[:, :, start : start + n] for t in ref)
        out = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, enable_gqa=True)
        want.append(out.transpose(1, 2))
        start += n
    torch.cat(want, 1).backward(grad)
    ours = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    got = _rows_attention(*ours, lengths, 0.0, None, training=True)
    assert got.shape == (1, sum(lengths), 9, 64) and got.is_contiguous()
    got.backward(grad.bfloat16())
    pairs = [(got, torch.cat(want, 1))] + [(a.grad, b.grad) for a, b in zip(ours, ref)]
    for name, (a, b) in zip(("out", "dq", "dk", "dv"), pairs):
        err = (a.float() - b).abs().max().item()
        assert err <= 0.02 * b.abs().max().item(), f"{name}: max diff {err:.3g}"
    # Control: a row that sees the row before it (one mask too wide) is far off.
    leaky = _rows_attention(*(t.detach() for t in ours), [42, 64, 1, 23], 0.0, None, True)
    assert (leaky.float() - torch.cat(want, 1)).abs().max() > 0.1
