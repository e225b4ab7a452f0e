"""RMSNorm and rotary embeddings in fewer passes over memory, for training.

Why by hand: in a bf16 LoRA step on CPU a third of the time is elementwise ops that eager
PyTorch runs one pass at a time (bench/profile_step.py, BENCHMARKS.md), and torch.compile's
CPU code for them was no faster than eager at these sizes, after a compile that costs a
third of the Quickstart (measured twice, BENCHMARKS.md). What autograd records for them is
the expensive part: transformers' RMSNorm keeps an fp32 copy of its input and walks back
through six ops; its rotary embedding's backward goes through `cat` and two slices, each
slice's backward a zero-filled buffer plus a copy. These two autograd Functions compute the
same forward bit for bit (checked on each module and function before it is swapped) and a
closed-form backward.

Only training uses them (train/lora_setup.py); generation, the API and export run the
model's own code.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """transformers' `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32, copy=True)  # a copy even for fp32 x: mul_ below writes it
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # [..., 1]
        normed = xf.mul_(rstd).to(x.dtype)
        out = normed.mul_(weight) if weight.dtype == x.dtype else weight * normed
        # Keeps x (bf16 here, which the previous op's backward holds anyway) and a per-token
        # scalar, where autograd of the module keeps an fp32 copy of x and more.
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        # d/d(normed) = grad * weight, rounded to x's dtype as the module's cast back does.
        g = (grad * weight).to(x.dtype).float()
        xhat = x.float().mul_(rstd)
        dot = (g * xhat).mean(-1, keepdim=True)
        # d/dx of xhat = x * rstd(x): rstd * (g - xhat * mean(g * xhat)).
        grad_x = g.sub_(xhat.mul(dot)).mul_(rstd).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            grad_w = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def _fused_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _RMSNormFn.apply(x, self.weight, self.variance_epsilon)


def _is_plain_rmsnorm(module: nn.Module) -> bool:
    """True when `module` computes exactly what _RMSNormFn does, checked on a probe input.

    Name checks alone would swap Gemma's (1 + weight) norm or a norm with an offset; the
    probe catches any such variant whatever its class is called."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None:
        return False
    if weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=gen).mul_(3).to(weight.device, weight.dtype)
    with torch.no_grad():
        return torch.equal(module(probe), _RMSNormFn.apply(probe, weight, eps))


class _RotaryFn(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin`, rotate_half(x) = cat(-x2, x1)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        # The sign of rotate_half moves onto sin: cat(-x2, x1) * sin = cat(x2, x1) * cat(-s1, s2).
        # cos and sin are [.., T, d] per forward, far smaller than x ([.., heads, T, d]).
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        out = x * cos
        out.add_(swapped.mul_(signed_sin))  # rounded as the module's (x*cos) + (rot*sin)
        ctx.save_for_backward(cos, sin)
        ctx.half = half
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = ctx.half
        # The transpose of x -> cat(-x2, x1) is y -> cat(y2, -y1):
        # dx = grad * cos + cat((grad*sin)2, -(grad*sin)1) = grad*cos + swap(grad) * cat(s2, -s1).
        back_sin = torch.cat((sin[..., half:], -sin[..., :half]), dim=-1)
        swapped = torch.cat((grad[..., half:], grad[..., :half]), dim=-1)
        grad_x = grad * cos
        grad_x.add_(swapped.mul_(back_sin))
        return grad_x, None, None


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for transformers' Llama-family `apply_rotary_pos_emb` (same signature)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _RotaryFn.apply(q, cos, sin), _RotaryFn.apply(k, cos, sin)


def _patch_rotary(model: nn.Module) -> bool:
    """Point the model's modeling module at the fused rotary, if it uses the standard one.

    transformers calls `apply_rotary_pos_emb` as a global of the model's modeling module, so
    that global is what changes (for this process, every model of that architecture: the
    forward is the same bit for bit, see tests/test_fused_ops.py). Probed like the norm."""
    modules = {
        sys.modules.get(type(m).__module__)
        for m in model.modules()
        if type(m).__name__.endswith("Attention")  # the caller of apply_rotary_pos_emb
    }
    patched = False
    for mod in modules:
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is fused_apply_rotary_pos_emb:
            patched = True
        elif original is not None and hasattr(mod, "rotate_half") and _same_rotary(original):
            mod._lora_alpaca_original_rotary = original  # for bench/speed_variants.py
            mod.apply_rotary_pos_emb = fused_apply_rotary_pos_emb
            patched = True
    return patched


def _same_rotary(original) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = torch.randn(1, 4, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    angles = torch.randn(1, 5, 8, generator=gen)
    try:
        want = original(q, k, angles.cos(), angles.sin())
    except Exception:  # another signature (partial rotary, interleaved...): left alone
        return False
    got = fused_apply_rotary_pos_emb(q, k, angles.cos(), angles.sin())
    return all(torch.equal(a, b) for a, b in zip(want, got))


def use_fused_ops(model: nn.Module) -> tuple[int, bool]:
    """Swap plain RMSNorm modules and the standard rotary for the fused ones.

    Returns (norms swapped, rotary patched). Anything that does not match on its probe keeps
    its own code, so an architecture this does not know trains exactly as before."""
    norms = [m for m in model.modules() if _is_plain_rmsnorm(m)]
    for norm in norms:
        # An instance attribute: the module keeps its class, parameters, hooks and state_dict.
        norm.forward = types.MethodType(_fused_norm_forward, norm)
    return len(norms), _patch_rotary(model)
