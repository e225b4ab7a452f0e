"""Training's fused RMSNorm and rotary (train/fused_ops.py): the model's own forward bit for
bit, its gradients to rounding, and swapped only where the probe says the code is the same."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_alpaca.train import fused_ops


def _layer_grads(model, ids, pos):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=pos)
    # Gradients reach the input of every norm and rotary through the embeddings.
    out.logits.float().pow(2).mean().backward()
    return out.logits.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_matches_the_model_code(tmp_path, arch, dtype):
    from tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / arch, arch=arch)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    module = __import__(type(reference.model.layers[0].self_attn).__module__, fromlist=["x"])
    original_rotary = module.apply_rotary_pos_emb
    fused = copy.deepcopy(reference)
    # The reference runs transformers' own rotary even after the fused one is patched in.
    norms, rotary = fused_ops.use_fused_ops(fused)
    try:
        assert norms == 2 * 2 + 1 and rotary  # two per layer and the final norm; positive control
        assert module.apply_rotary_pos_emb is fused_ops.fused_apply_rotary_pos_emb
        ids = torch.randint(0, reference.config.vocab_size, (1, 23))
        pos = torch.cat([torch.arange(15), torch.arange(8)]).unsqueeze(0)  # two packed rows
        logits, grads = _layer_grads(fused, ids, pos)
        module.apply_rotary_pos_emb = original_rotary
        ref_logits, ref_grads = _layer_grads(reference, ids, pos)
    finally:
        module.apply_rotary_pos_emb = original_rotary
    assert torch.equal(logits, ref_logits)  # the same forward, bit for bit
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad.float(), ref_grads[name].float(), **tol, msg=name)


def test_norm_weight_gradient_and_rotary_gradcheck():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # The weight trains too when a norm is in modules_to_save: its gradient comes back.
    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 16, requires_grad=True)
    grad = torch.randn(4, 3, 16)
    want = torch.autograd.grad(norm(x), (x, norm.weight), grad)
    got = torch.autograd.grad(
        fused_ops._RMSNormFn.apply(x, norm.weight, 1e-5), (x, norm.weight), grad
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The rotary has no casts: its closed-form backward checks against finite differences.
    angles = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q: fused_ops._RotaryFn.apply(q, angles.cos(), angles.sin()), (q,)
    )


def test_other_norms_and_rotaries_keep_their_own_code():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + weight): a different function under the same name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            v = x.float().pow(2).mean(-1, keepdim=True)
            return ((x.float() * torch.rsqrt(v + self.variance_epsilon)) * (1 + self.weight)).to(
                x.dtype
            )

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(GemmaLikeRMSNorm(), LlamaRMSNorm(8), nn.LayerNorm(8))
    norms, rotary = fused_ops.use_fused_ops(model)
    assert norms == 1 and not rotary  # only the plain one; no modeling module with a rotary
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs: not rotate_half
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    assert not fused_ops._same_rotary(interleaved)
