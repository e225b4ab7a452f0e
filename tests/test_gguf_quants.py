"""GGUF quantizations: K-quant block packing read back by the `gguf` package's own
dequantizer (the independent reference), measured error per format, llama.cpp's type mix,
and a real `--gguf q4_k_m,q5_k_m` export of a tiny model wide enough for K-quants."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from adapters import make_adapter
from conftest import export
from tiny import make_tiny_model

from lora_alpaca.errors import UsageError
from lora_alpaca.export import quants
from lora_alpaca.export.quants import parse_gguf_types, tensor_type

T = gguf.GGMLQuantizationType
F32 = np.float32


def probe_blocks(n_rows: int = 16, width: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the blocks that break naive code: all zero, constant positive,
    constant negative, one huge outlier, heavy tails."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, width)) * 0.02).astype(F32)
    x[1, :256] = 0
    x[2, :256] = 0.5
    x[3, :256] = -0.25
    x[4, 7] = 3.0
    x[5] = rng.standard_t(3, width).astype(F32) * 0.02
    x[6, :32] = 0  # one zero sub-block inside a normal super-block
    return x


def _dequant(data: np.ndarray, t: T) -> np.ndarray:
    return gguf.quants.dequantize(data, t).reshape(-1, 256)


@pytest.mark.parametrize("t, nmax", [(T.Q4_K, 15), (T.Q5_K, 31)])
def test_q4_k_q5_k_fields_read_back_exactly(t, nmax):
    blocks = probe_blocks().reshape(-1, 256)
    fields = (quants.q4_k_fields if t == T.Q4_K else quants.q5_k_fields)(blocks)
    d, dmin, sc, m, lv = fields
    assert sc.max() <= 63 and m.max() <= 63 and lv.max() <= nmax
    packed = (quants.pack_q4_k if t == T.Q4_K else quants.pack_q5_k)(*fields)
    assert packed.shape == (len(blocks), gguf.GGML_QUANT_SIZES[t][1])
    # the 12-byte scale/min packing, read by gguf's own unpacker
    got_sc, got_m = gguf.quants.Q4_K.get_scale_min(packed[:, 4:16])
    assert np.array_equal(got_sc, sc) and np.array_equal(got_m, m)
    # every value, as gguf dequantizes it, is exactly d*sc*L - dmin*m of our fields
    dj = (d.astype(F32)[:, None] * sc.astype(F32))[:, :, None]
    dmj = (dmin.astype(F32)[:, None] * m.astype(F32))[:, :, None]
    want = (dj * lv.reshape(-1, 8, 32).astype(F32) - dmj).reshape(-1, 256)
    assert np.array_equal(_dequant(packed, t), want)
    # and the levels alone: with d = 1, sc = 1, no min, dequantizing gives L back
    ones = np.ones(len(blocks), np.float16)
    raw = (quants.pack_q4_k if t == T.Q4_K else quants.pack_q5_k)(
        ones, 0 * ones, np.ones_like(sc), np.zeros_like(m), lv
    )
    assert np.array_equal(_dequant(raw, t), lv.astype(F32))
    assert np.all(_dequant(packed, t)[4] == 0)  # the all-zero block (row 1) stays zero


def test_q6_k_fields_read_back_exactly():
    blocks = probe_blocks().reshape(-1, 256)
    d, sc, lv = quants.q6_k_fields(blocks)
    assert lv.max() <= 63 and sc.dtype == np.int8
    packed = quants.pack_q6_k(d, sc, lv)
    assert packed.shape == (len(blocks), 210)
    want = (
        (d.astype(F32)[:, None] * sc.astype(F32))[:, :, None]
        * (lv.reshape(-1, 16, 16).astype(np.int8) - 32).astype(F32)
    ).reshape(-1, 256)
    assert np.array_equal(_dequant(packed, T.Q6_K), want)
    raw = quants.pack_q6_k(np.ones(len(blocks), np.float16), np.ones_like(sc), lv)
    assert np.array_equal(_dequant(raw, T.Q6_K), lv.astype(F32) - 32)
    assert not packed[4].any()  # the all-zero block (row 1): all-zero bytes, as ggml writes it


# Relative RMS error on Gaussian weights (16 x 1024), measured with this code (seeds 0/1/2):
# Q4_K 0.0710/0.0719/0.0715, Q5_K 0.0362 (all three), Q6_K 0.0177/0.0178/0.0175; the gguf
# package's Q4_0 0.086, Q5_0 0.043, Q8_0 0.0053. Bounds ~8% above the seed-0 figure; the
# K-quants must also beat the 32-block type of the same bit width.
ERROR_BOUNDS = {T.Q4_K: 0.077, T.Q5_K: 0.039, T.Q6_K: 0.019}


def test_error_per_format_measured_and_ordered():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 1024)) * 0.02).astype(F32)

    def rel_rmse(t):
        back = gguf.quants.dequantize(quants.quantize(x, t), t)
        return float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2)))

    err = {t: rel_rmse(t) for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q5_0, T.Q8_0)}
    for t, bound in ERROR_BOUNDS.items():
        assert err[t] < bound, (t.name, err[t])
    assert err[T.Q4_K] < err[T.Q4_0] and err[T.Q5_K] < err[T.Q5_0]
    assert err[T.Q8_0] < err[T.Q6_K] < err[T.Q5_K] < err[T.Q4_K]
    # each value within one step of its sub-block of the original (measured: 0.72 of a step
    # at most); a wrong nibble or sub-block order would be off by many steps
    d, dmin, sc, m, lv = quants.q4_k_fields(x.reshape(-1, 256))
    step = np.repeat(d.astype(F32)[:, None] * sc, 32, axis=1)
    back = gguf.quants.dequantize(quants.quantize(x, T.Q4_K), T.Q4_K).reshape(-1, 256)
    assert np.all(np.abs(back - x.reshape(-1, 256)) <= step)


def test_type_mix_is_llama_quantize_s():
    def mix(ftype, n_layers=32, width=4096, ff=11008, tied=False):
        names = {"token_embd.weight": (32000, width), "output.weight": (32000, width)}
        for i in range(n_layers):
            for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
                names[f"blk.{i}.{p}.weight"] = (width, width)
            names[f"blk.{i}.ffn_down.weight"] = (width, ff)
            names[f"blk.{i}.attn_norm.weight"] = (width,)
        if tied:
            del names["output.weight"]
        got = {n: tensor_type(n, s, ftype, n_layers, tied) for n, s in names.items()}
        counts: dict[str, int] = {}
        for t in got.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        return got, counts

    # LLaMA-2-7B as llama-quantize reports it: Q4_K_M = 193 q4_K + 33 q6_K (+ f32 norms)
    got, counts = mix("q4_k_m")
    assert counts == {"Q4_K": 193, "Q6_K": 33, "F32": 32}
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == T.Q4_K
    more = [i for i in range(32) if got[f"blk.{i}.attn_v.weight"] == T.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if got[f"blk.{i}.ffn_down.weight"] == T.Q6_K] == more
    assert mix("q5_k_m")[1] == {"Q5_K": 193, "Q6_K": 33, "F32": 32}
    assert mix("q6_k")[1] == {"Q6_K": 226, "F32": 32}
    assert mix("q4_0")[1] == {"Q4_0": 225, "Q6_K": 1, "F32": 32}  # output.weight Q6_K
    # SmolLM2-135M: 576-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0); ffn_down is 1536 wide
    got, counts = mix("q4_k_m", n_layers=30, width=576, ff=1536, tied=True)
    assert got["token_embd.weight"] == T.Q8_0 and got["blk.0.attn_q.weight"] == T.Q5_0
    assert got["blk.0.attn_v.weight"] == T.Q8_0  # use_more_bits layer: Q6_K, which falls back
    assert got["blk.4.ffn_down.weight"] == T.Q4_K and got["blk.0.ffn_down.weight"] == T.Q6_K
    assert mix("q5_k_m", 30, 576, 1536, True)[0]["blk.4.attn_q.weight"] == T.Q5_1
    # a row length 32 does not divide: F16, as llama.cpp's last resort
    assert tensor_type("blk.0.attn_q.weight", (48, 48), "q4_k_m", 2, False) == T.F16


def test_gguf_flag_values():
    assert parse_gguf_types("q4_k_m, Q5_K_M,q4_k_m") == ["q4_k_m", "q5_k_m"]
    assert parse_gguf_types("none") == []
    with pytest.raises(UsageError, match=r"'q4_k' is not a GGUF type; allowed: none"):
        parse_gguf_types("q8_0,q4_k")
    with pytest.raises(UsageError):
        parse_gguf_types("q8_0,")


def make_wide_tiny(out_dir: Path) -> Path:
    """A 2-layer LLaMA whose rows (256 / 512) are whole K-quant super-blocks.

    Random weights give near-flat logits whose top-1 any 4-bit rounding flips (top-1
    agreement 0.41 measured), so the output head is set to the embedding (std 1): the model
    mostly predicts its input token, with a margin quantization noise cannot close, while a
    wrong packing of token_embd (Q4_K) or output (Q6_K) would still wreck the logits.
    """

    def head_is_embedding(model):
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)

    return make_tiny_model(out_dir, hidden_size=256, intermediate_size=512,
                           max_position_embeddings=512, edit=head_is_embedding)  # fmt: skip


def test_export_q4_k_m_and_q5_k_m(tmp_path):
    base = make_wide_tiny(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    r = export(adapter, out, "--gguf", "q4_k_m,q5_k_m", "--gguf_only", "--parity_prompts", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # transformers' own GGUF-reading progress bar is silenced (our stage lines time it).
    assert "de-quantizing GGUF tensors" not in r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model-q4_k_m.gguf", "model-q5_k_m.gguf"]
    want = {
        "q4_k_m": {"blk.0.attn_v.weight": T.Q4_K, "blk.1.attn_v.weight": T.Q6_K},
        "q5_k_m": {"blk.0.ffn_down.weight": T.Q5_K, "blk.1.ffn_down.weight": T.Q6_K},
    }
    for qtype, some in want.items():
        reader = gguf.GGUFReader(out / f"model-{qtype}.gguf")
        types = {t.name: t.tensor_type for t in reader.tensors}
        for name, t in some.items():
            assert types[name] == t, (qtype, name, types[name])
        assert types["output.weight"] == T.Q6_K and types["blk.0.attn_norm.weight"] == T.F32
        assert int(reader.fields["general.file_type"].contents()) == quants.FILE_TYPES[qtype][1]
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"parity PASS gguf {qtype}:"))
        assert "MB" in line and "Q6_K" in line, line
    report = json.loads((out / "parity.json").read_text())
    sections = {s["target"]: s for s in report["checks"]}
    assert sections["gguf q4_k_m"]["file_bytes"] == (out / "model-q4_k_m.gguf").stat().st_size
    assert (
        sections["gguf q4_k_m"]["max_abs_logit_diff"]
        > sections["gguf q5_k_m"]["max_abs_logit_diff"]
        > 0
    )
