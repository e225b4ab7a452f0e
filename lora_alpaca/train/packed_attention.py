"""Attention over a packed micro-batch that computes only the block-diagonal part.

A packed micro-batch is one [1, T] sequence of rows with position ids restarting at 0
(data/packing.py). transformers' sdpa path builds the block-diagonal causal [T, T] mask and
hands it to torch's sdpa, which then computes all T x T scores (a masked kernel cannot skip
blocks) and, on CPU, falls to a slower masked kernel in backward. Profiled on SmolLM2 with
4 Alpaca rows (bench/profile_step.py): attention was a third of the step. Running sdpa once
per row costs sum(L_i^2) instead of T^2: ~4x less for 4 rows.

flash-attention varlen does this on GPU; torch has no varlen attention on CPU and flex
attention needs torch.compile to be fast, hence this small function, registered with transformers'
AttentionInterface so the model code is untouched. Anything that is not a packed sequence
(padded batches, a cache, left padding) goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lora_alpaca_packed_sdpa"


def row_lengths(position_ids: torch.Tensor | None) -> list[int] | None:
    """Row lengths when position_ids is [1, T] of concatenated 0..L-1 ranges, else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    if pos.numel() == 0 or int(pos[0]) != 0:
        return None
    step = pos[1:] - pos[:-1]
    if not bool(((step == 1) | (pos[1:] == 0)).all()):
        return None  # e.g. a left-padded prompt: positions 1,1,0,1,2...
    starts = torch.nonzero(pos == 0).flatten().tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


# One forward calls attention once per layer with the same position_ids tensor: compute the
# row lengths (a host sync) once per forward, not once per layer.
_cache: dict = {"ids": None, "lengths": None}


def _cached_lengths(position_ids):
    if _cache["ids"] is not position_ids:
        _cache["ids"], _cache["lengths"] = position_ids, row_lengths(position_ids)
    return _cache["lengths"]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kwargs):  # fmt: skip
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if query.shape[0] == 1 and query.shape[2] == key.shape[2] and query.shape[2] > 1:
        lengths = _cached_lengths(kwargs.get("position_ids"))
    # Only plain causal attention is rewritten: softcapping, position biases, sliding windows
    # (Mistral, Qwen2 sliding layers) and non-causal modules keep transformers' own path.
    special = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sliding_window"))
    if lengths is None or special or not getattr(module, "is_causal", True) or is_causal is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)  # fmt: skip
    return _rows_attention(query, key, value, lengths, dropout, scaling, module.training), None


def _rows_attention(query, key, value, lengths, dropout, scaling, training):
    # Plain matmul + softmax per row, not torch's sdpa: on the AVX512-BF16 CPU
    # (bench/profile_step.py, BENCHMARKS.md) the flash-attention-for-CPU kernel ran fwd+bwd of
    # 4 causal 120-token rows 1.4x faster per row than masked over the whole pack, but this
    # eager form 2.4x: its bmm calls hit the bf16 GEMM, the flash kernel's small blocks do not.
    # On the AMX Xeon (2026-12-03): sdpa per row fwd+bwd 2.5x slower than this, 30 layers.
    # The cost is the [H, L, L] scores held for backward, per row (L <= cutoff_len), as HF's
    # eager path does.
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # The scale goes on q ([H, T, d]), not on the scores ([H, L, L] per row): one pass over
    # far fewer elements. The scores stay in the matmul's dtype: masked_fill and softmax run
    # on them as they are (torch's CPU softmax of bf16 computes in fp32 and rounds once, the
    # same values as HF's fp32 softmax followed by its cast to bf16), so no [H, L, L] fp32
    # copy is made, scaled or cast back, in forward or in backward (profiled: these casts
    # were a third of attention's time in bf16).
    query = query * scale
    outs = []
    # torch.split, not a slice per row: split's backward is one cat, where each slice's
    # backward writes its rows into a fresh zeroed [1, H, T, d] and the slices' gradients are
    # then added up (profiled: those zero-fills, copies and adds were a quarter of attention's
    # time for 4 rows).
    rows = zip(query.split(lengths, dim=2), key[0].split(lengths, dim=1),
               value[0].split(lengths, dim=1))  # fmt: skip
    for q, k, v in rows:
        n = k.shape[1]
        # GQA as one plain bmm per row: the `groups` query heads that share a kv head are
        # stacked along the rows of one matmul ([kv, groups * n, d] against [kv, d, n]). A
        # broadcasting matmul over a groups axis instead copies each k and v `groups` times
        # and sums their gradients over that axis in bf16; here the sum happens inside the
        # GEMM's fp32 accumulation (closer to an fp32 reference, tested).
        q = q.reshape(kv_heads, groups * n, dim)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if n > 1:
            # + (0 or -inf), not masked_fill with a bool mask: the same scores and gradients
            # bit for bit (softmax's gradient is already 0 where p = 0), but bool tensors take
            # torch's slow CPU paths and masked_fill runs again in backward: fwd+bwd of mask +
            # softmax for a 125-token row, 9 heads, bf16: 0.50 ms instead of 0.72.
            # In place: matmul's backward needs q and k, not its output.
            causal = _causal_bias(n, scores.device, scores.dtype)
            scores.view(kv_heads, groups, n, n).add_(causal)
        probs = scores.softmax(-1).to(v.dtype)
        if dropout and training:
            probs = F.dropout(probs, p=dropout)
        # [1, n, H, d] per row, joined along the tokens by one cat: the layout the model's
        # o_proj reads, with one copy (a cat along heads' rows and then .contiguous() of the
        # transpose made two).
        outs.append(torch.matmul(probs, v).reshape(1, heads, n, dim).transpose(1, 2))
    return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)


_bias_cache: dict = {}


def _causal_bias(n: int, device, dtype) -> torch.Tensor:
    """[n, n] of `dtype`: 0 on and below the diagonal, -inf above (future positions), cut
    from one cached matrix per device and dtype."""
    big = _bias_cache.get((device, dtype))
    if big is None or big.shape[0] < n:
        size = max(n, 512)
        big = torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu(1)
        _bias_cache[(device, dtype)] = big
    return big[:n, :n]


def use_packed_attention(model) -> bool:
    """Switch a model that runs transformers' sdpa to the packed function; True if switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_sdpa_forward)
    # The same mask as sdpa, for the calls that fall back to sdpa (padded batches).
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
