"""LoRA dropout on CPU (train/dropout.py): the distribution nn.Dropout has, from a quarter of
the random draws, seeded and resumable by torch's own generator."""

from __future__ import annotations

import pytest
import torch

from lora_alpaca.train.dropout import CpuDropout, keep_mask, keep_scale, keep_values


def test_mask_is_bernoulli_with_exact_expectation():
    torch.manual_seed(0)
    n, p = 1 << 22, 0.05
    kept = keep_mask((n,), p)
    mask = kept * keep_scale(p)
    p_eff = round(p * 65536) / 65536
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs((~kept).float().mean().item() - p_eff) < 5 * sigma
    assert torch.all(mask[kept] == 1 / (1 - p_eff))
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p_eff)  # E[mask] = 1
    # The four 16-bit numbers of one 64-bit draw are each uniform: the same drop rate in
    # every slot, and no correlation between neighbouring slots.
    slots = (~kept).float().view(-1, 4)
    for rate in slots.mean(0).tolist():
        assert abs(rate - p_eff) < 5 * 2 * sigma
    both = (slots[:, 0] * slots[:, 1]).mean().item()
    assert abs(both - p_eff**2) < 5 * (p_eff**2 / (n / 4)) ** 0.5
    # Consecutive masks differ (fresh draws), shapes other than multiples of 4 work.
    odd = keep_mask((7, 13), 0.5)
    assert odd.shape == (7, 13) and odd.dtype == torch.bool
    assert not torch.equal(keep_mask((n,), p), kept)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_forward_backward_and_modes(p):
    drop = CpuDropout(p).train()
    x = torch.randn(64, 96, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    mask = g  # d(sum(x * mask))/dx = mask
    scale = 1 / (1 - round(p * 65536) / 65536)
    assert all(v == 0.0 or v == pytest.approx(scale) for v in mask.unique().tolist())
    assert 0 < (mask == 0).float().mean().item() < 1
    torch.testing.assert_close(y, x * mask)
    # Seeded by torch's generator: the same seed (or a restored RNG state) gives the same mask.
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y)
    state = torch.get_rng_state()
    first = drop(x)
    torch.set_rng_state(state)
    torch.testing.assert_close(drop(x), first)
    # Evaluation and p = 0 change nothing.
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)


def test_bf16_kept_values_are_scaled_in_fp32_like_nn_dropout():
    # The kept values are x / (1 - p) rounded once to bf16 (what nn.Dropout gives), not x
    # times 1/(1-p) already rounded to bf16 (1.0547 for p = 0.05: a 0.2% bias on every input).
    x = torch.randn(256, 64).bfloat16()
    y = CpuDropout(0.05).train()(x)
    kept = y != 0
    expected = (x.float() * keep_scale(0.05)).bfloat16()
    assert torch.equal(y[kept], expected[kept])
    assert not torch.equal(y[kept], x[kept] * torch.tensor(keep_scale(0.05)).bfloat16())


@pytest.mark.parametrize("p", [0.05, 0.5, 1 / 65536])
def test_mask_values_are_the_bool_mask_of_the_same_draws(p):
    # CpuDropout multiplies by keep_values; it must be keep_mask exactly, boundary included
    # (a draw equal to the threshold is kept), for the same generator state.
    from lora_alpaca.train import dropout

    state = torch.get_rng_state()
    kept = keep_mask((4096, 33), p)
    torch.set_rng_state(state)
    values = keep_values((4096, 33), p, torch.bfloat16)
    assert values.dtype == torch.bfloat16 and set(values.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(values.bool(), kept)
    t = dropout._threshold(p)
    edge = torch.tensor([-32768, t - 1, t, 32767], dtype=torch.int16)
    assert dropout._kept01(edge, p).tolist() == [0, 0, 1, 1]
    assert (edge >= t).tolist() == [False, False, True, True]  # keep_mask's rule, same edges
    # And the layer's output is the mask's: dropped exactly where keep_mask is False.
    x = torch.randn(4096, 33).bfloat16() + 8  # no zeros in the input itself
    torch.set_rng_state(state)
    y = CpuDropout(p).train()(x)
    assert torch.equal(y != 0, kept)
