"""LoRA dropout on CPU (train/dropout.py): the distribution nn.Dropout has, from a quarter of
the random draws, seeded and resumable by torch's own generator."""

from __future__ import annotations

import pytest
import torch

from lora_alpaca.train.dropout import CpuDropout, keep_mask, keep_scale


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
