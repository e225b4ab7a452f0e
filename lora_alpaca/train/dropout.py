"""LoRA dropout on CPU with a mask cut out of 64-bit random draws.

Why: torch's CPU dropout draws one value per element from its (serial) mt19937 generator:
3.2 ms for a [495, 576] input on this project's 2-core CPU, ~5% of a SmolLM2 training step
with LoRA on q_proj,v_proj and ~9% with q,k,v,o (bench/profile_step.py, BENCHMARKS.md). One
64-bit draw holds four independent uniform 16-bit numbers, so the same mask needs a quarter
of the draws: 0.6 ms. The draws still come from torch's default generator, so `--seed`,
resume (the saved RNG state) and per-rank streams behave exactly as with nn.Dropout.

The drop probability is rounded to a multiple of 1/65536 (0.05 -> 0.0500031) and the kept
values are scaled by 1/(1 - that probability), so the expectation is exact. GPUs keep
nn.Dropout (their Philox generator is not the bottleneck).

On in finetune.py (train/lora_setup.py add_lora) since 2026-12-02: measured 1.07x a step in
fp32 and 1.12x in bf16 (bench/speed_variants.py) at the same held-out loss. Its other random
stream gives another adapter than nn.Dropout's; the README's Quickstart sample was made
robust to that (13 adapters of both masks, four seeds, bf16 and fp32: the same answer).
Since 2026-12-03 the mask is applied as a 0/1 multiply instead of torch.where: the same
values bit for bit, fwd+bwd of the dropout plus lora_A on a [500, 576] bf16 input 1.38 ms
instead of 1.84 (2 threads, AMX Xeon, best of 6 interleaved), ~2-4% of a step, below the
step-level noise of that shared VM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LEVELS = 1 << 16


class CpuDropout(nn.Dropout):
    """nn.Dropout with the 16-bit mask on CPU in training; plain nn.Dropout otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        # x * scale with a Python float computes in fp32 and rounds once, as nn.Dropout does
        # (a bf16 mask would hold 1/(1-p) rounded to bf16: 1.0547 for 1.0526, a 0.2% bias);
        # the product with an exact 0/1 mask then changes nothing else. Not torch.where with
        # the bool mask: bool tensors take torch's slow CPU paths (measured on [495, 576]
        # bf16: where 440 us, this multiply 150 us, the compare that makes a bool mask 200 us
        # against keep_values' 120 us), in forward and again in backward.
        return torch.mul(x, keep_scale(self.p)).mul_(keep_values(x.shape, self.p, x.dtype))


def keep_scale(p: float) -> float:
    """1/(1-p) for p rounded to a multiple of 1/65536, as keep_mask rounds it."""
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def _uniform16(shape) -> torch.Tensor:
    n = math.prod(shape)
    # Full 64-bit range: torch then fills every bit from the generator (random_full_64_bits).
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return draws.view(torch.int16)[:n].view(shape)  # each in [-32768, 32767], uniform


def _threshold(p: float) -> int:
    return round(p * _LEVELS) - _LEVELS // 2  # kept where uniform16 >= this


def keep_mask(shape, p: float) -> torch.Tensor:
    """bool mask, False with probability ~p (p rounded to a multiple of 1/65536)."""
    return _uniform16(shape) >= _threshold(p)


def keep_values(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """keep_mask as exact 0/1 values of `dtype`, from the same draws (the same mask for the
    same generator state)."""
    return _kept01(_uniform16(shape), p).to(dtype)


def _kept01(uniform16: torch.Tensor, p: float) -> torch.Tensor:
    """int32 1 where uniform16 >= the threshold t, else 0, with integer ops and no bool
    tensor: clamp(u - t + 1, 0, 1). int32 because u - t overflows int16."""
    return uniform16.to(torch.int32).sub_(_threshold(p) - 1).clamp_(0, 1)


def use_cpu_dropout(peft_model) -> int:
    """Swap each LoRA layer's nn.Dropout for CpuDropout (same p); returns how many."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in module.lora_dropout.items():
                if type(drop) is nn.Dropout:
                    module.lora_dropout[name] = CpuDropout(drop.p)
                    swapped += 1
    return swapped
