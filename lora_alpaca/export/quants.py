"""The GGUF quantizations people download (Q4_K_M, Q5_K_M, Q6_K, Q4_0, beside f16 / q8_0).

Two parts, both written by hand because nothing importable has them:

- the ggml type each tensor gets in a mix, restated from llama.cpp's `llama-quantize`
  (src/llama-quant.cpp: `llama_tensor_get_type_impl` and `tensor_type_fallback`) for the
  LLaMA family: output / tied token embedding -> Q6_K; in Q4_K_M and Q5_K_M, attn_v and
  ffn_down -> Q6_K on the layers `use_more_bits` picks; a row length that the chosen type's
  block does not divide falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).
  SmolLM2's 576-wide rows are such a case: there only ffn_down (1536 wide) is K-quantized,
  as llama-quantize itself would do.
- numpy quantizers for Q4_K / Q5_K / Q6_K, which the `gguf` package can read but not write.
  They follow ggml-quants.c's `quantize_row_q{4,5,6}_K_ref` step by step (the same weighted
  scale/min search, `make_qkx2_quants` / `make_qx_quants`), vectorized over all blocks of a
  tensor; bench/gguf_quants.py compares their bytes with that C reference. The 32-wide block
  types (Q4_0, Q5_0, Q5_1, Q8_0) use the `gguf` package's own quantizers.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from lora_alpaca.errors import UsageError

QK_K = 256
F32 = np.float32
# --gguf value -> (default tensor type of the mix, general.file_type llama.cpp reads).
FILE_TYPES = {
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q6_k": (T.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (T.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _sum(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right in float32, as the C loops do (numpy's pairwise order
    rounds differently and flips near-tied scale choices). Cost: one pass per column."""
    acc = a[:, 0].copy()
    for j in range(1, a.shape[1]):
        acc += a[:, j]
    return acc


def parse_gguf_types(value: str) -> list[str]:
    """`--gguf f16,q4_k_m` -> ["f16", "q4_k_m"]; "none" -> []; anything else: one clear line."""
    items = [v.strip().lower() for v in (value or "").split(",")]
    if items == ["none"]:
        return []
    bad = [v for v in items if v not in FILE_TYPES]
    if bad:
        raise UsageError(
            f"--gguf {value!r}: {bad[0]!r} is not a GGUF type; allowed: none, or one or several "
            f"(comma-separated) of {', '.join(FILE_TYPES)}"
        )
    return list(dict.fromkeys(items))


def _block(t: T) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama-quant.cpp's rule: the first and last eighth of the layers, and every third between.
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, tied: bool) -> T:
    """The ggml type llama-quantize gives GGUF tensor `name` in mix `ftype`.

    Simplification: llama.cpp counts attn_v / ffn_down tensors as it meets them; for a dense
    model with one of each per layer that count is the layer index read from the name here.
    """
    default = FILE_TYPES[ftype][0]
    if len(shape) < 2:
        return T.F32  # norms stay f32, as llama.cpp keeps them
    if default == T.F16:
        return T.F16
    ncols = shape[-1]
    new = default
    m = _LAYER.match(name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % _block(default):
            new = T.Q8_0
        elif default != T.Q8_0:
            new = T.Q6_K
    elif (
        ftype in ("q4_k_m", "q5_k_m")
        and m
        and (".attn_v." in name or ".ffn_down." in name)
        and _use_more_bits(int(m.group(1)), n_layers)
    ):
        new = T.Q6_K
    if ncols % _block(new):
        new = FALLBACK.get(new, new)
        if ncols % _block(new):
            new = T.F16
    return new


# ---- K-quant fields: the integers and fp16 scales a block stores (tests check these) ----


def _qkx2(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over rows of x [B, 32], weights av_x + |x| as the q4_K/q5_K callers
    pass: (scale, -min) per row. Sequential over the nstep candidate scales (min moves when a
    candidate wins, as in C), vectorized over rows. Cost: ~nstep+1 passes over the tensor."""
    w = np.sqrt(_sum(x * x) / F32(32))[:, None] + np.abs(x)
    mx = x.max(1)
    mn = np.minimum(x.min(1), F32(0))
    flat = mx == mn
    sum_w, sum_x = _sum(w), _sum(w * x)
    rng = np.where(flat, F32(1), mx - mn)
    iscale = F32(nmax) / rng
    scale = F32(1) / iscale
    levels = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = _sum(w * (scale[:, None] * levels + mn[:, None] - x) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            rng = np.where(flat, F32(1), mx - mn)
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng
            lv = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            wl = w * lv
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lv), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            err = _sum(w * (this_scale[:, None] * lv + this_min[:, None] - x) ** 2)
            take = (det > 0) & (err < best) & ~flat
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    return np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32)


def _k_fields(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Q4_K (nmax 15) / Q5_K (nmax 31): d, dmin fp16 [N]; sc, m uint8 [N, 8]; L uint8 [N, 256]."""
    n = len(blocks)
    sub = blocks.reshape(n * 8, 32)
    scales, mins = _qkx2(sub, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(1), F32(0))
    max_min = np.maximum(mins.max(1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    sc = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    dj = (d.astype(F32)[:, None] * sc.astype(F32))[:, :, None]
    dmj = (dmin.astype(F32)[:, None] * m.astype(F32))[:, :, None]
    x = blocks.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.where(dj != 0, np.clip(np.rint((x + dmj) / dj), 0, nmax), 0)
    return d, dmin, sc, m, lv.astype(np.uint8).reshape(n, QK_K)


def q4_k_fields(blocks: np.ndarray):
    return _k_fields(blocks, 15, -1.0, 20)


def q5_k_fields(blocks: np.ndarray):
    return _k_fields(blocks, 31, -0.5, 15)


def _qx_rmse1(x: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx_quants(rmse_type=1, no imatrix) over rows of x [B, 16]: the scale per row."""
    rows = np.arange(len(x))
    mx = x[rows, np.abs(x).argmax(1)]
    zero = np.abs(mx) < F32(1e-15)
    safe = np.where(zero, F32(1), mx)
    w = x * x

    def fit(iscale):
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return _sum(w * x * lv), _sum(w * lv * lv)

    with np.errstate(divide="ignore", invalid="ignore"):
        sumlx, suml2 = fit(F32(-nmax) / safe)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / safe)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    return np.where(zero, F32(0), scale).astype(F32)


def q6_k_fields(blocks: np.ndarray):
    """Q6_K: d fp16 [N]; sc int8 [N, 16]; L uint8 [N, 256] (stored as q + 32)."""
    n = len(blocks)
    scales = _qx_rmse1(blocks.reshape(n * 16, 16), 32).reshape(n, 16)
    max_scale = scales[np.arange(n), np.abs(scales).argmax(1)]  # first largest, as C's `>`
    zero = np.abs(max_scale) < F32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / np.where(zero, F32(1), max_scale))
        d = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), iscale)).astype(np.float16)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    dj = (d.astype(F32)[:, None] * sc.astype(F32))[:, :, None]
    x = blocks.reshape(n, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.where(dj != 0, np.clip(np.rint(x / dj), -32, 31) + 32, 32)
    lv = np.where(zero[:, None, None], 0, lv)  # C memsets an all-zero block
    return d, sc, lv.astype(np.uint8).reshape(n, QK_K)


# ---- packing, in the byte order ggml's block_q4_K / block_q5_K / block_q6_K declare ----


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins in 12 bytes (get_scale_min_k4 reads them back)."""
    return np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    ).astype(np.uint8)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def pack_q4_k(d, dmin, sc, m, lv) -> np.ndarray:
    q = lv.reshape(-1, 4, 2, 32)  # each 64 values: low nibbles first 32, high nibbles next
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qs], axis=1)


def pack_q5_k(d, dmin, sc, m, lv) -> np.ndarray:
    sub = lv.reshape(-1, 8, 32)
    qh = np.zeros((len(lv), 32), dtype=np.uint8)
    for i in range(8):  # bit i of qh[l] is the fifth bit of sub-block i's value l
        qh |= ((sub[:, i] >> 4) & 1) << i
    q = (lv & 0xF).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), qh, qs], axis=1)


def pack_q6_k(d, sc, lv) -> np.ndarray:
    q = lv.reshape(-1, 2, 4, 32)  # two halves of 128; four runs of 32 in each
    ql = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(-1, 128)
    qh = (
        (q[:, :, 0] >> 4)
        | ((q[:, :, 1] >> 4) << 2)
        | ((q[:, :, 2] >> 4) << 4)
        | ((q[:, :, 3] >> 4) << 6)
    ).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


_K_QUANT = {
    T.Q4_K: lambda b: pack_q4_k(*q4_k_fields(b)),
    T.Q5_K: lambda b: pack_q5_k(*q5_k_fields(b)),
    T.Q6_K: lambda b: pack_q6_k(*q6_k_fields(b)),
}
CHUNK_BLOCKS = 4096  # 1M values at a time: bounds the search's temporaries (~100 MB)


def quantize(arr: np.ndarray, t: T) -> np.ndarray:
    """`arr` (float, last axis a row) as GGUF tensor data of type `t`."""
    arr = np.ascontiguousarray(arr, dtype=F32)
    if t == T.F32:
        return arr
    if t == T.F16:
        return arr.astype(np.float16)
    if t not in _K_QUANT:
        return gguf.quants.quantize(arr, t)
    blocks = arr.reshape(-1, QK_K)
    out = np.concatenate(
        [_K_QUANT[t](blocks[i : i + CHUNK_BLOCKS]) for i in range(0, len(blocks), CHUNK_BLOCKS)]
    )
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * gguf.GGML_QUANT_SIZES[t][1])
