"""Benchmark: drift of every GGUF quantization the exporter writes, on SmolLM2-135M-Instruct.

For each type: write the GGUF from the fp32 model (the code export runs), its size and write
time, read it back through transformers' GGUF reader (as the parity check does) and compare
with the fp32 model on the parity check's prompts: max |logit difference|, the largest
reference |logit|, top-1 agreement over prompt positions, greedy continuations. The parity
tolerances in lora_alpaca/export/parity.py are set from these figures.

With --c_reference DIR (a llama.cpp source tree, e.g. the vendor/llama.cpp of
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`), also compile its
ggml-quants.c and compare our Q4_K / Q5_K / Q6_K bytes with `quantize_row_q*_K_ref` on the
model's ffn_down weights and on random data.

    python bench/gguf_quants.py [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--c_reference DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUBS = r"""
#include <stddef.h>
#include <stdlib.h>
void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int t, long n) { return 0; }
const char * ggml_type_name(int t) { return "?"; }
size_t ggml_type_size(int t) { return 0; }
"""


def c_reference(src: Path, tensors: dict, tmp: Path) -> list[str]:
    """Byte comparison with ggml's reference quantizers (compiled here with -O2, no FMA)."""
    import gguf
    import numpy as np

    from lora_alpaca.export.quants import quantize

    (tmp / "stubs.c").write_text(STUBS)
    lib_path = tmp / "libggmlq.so"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", f"-I{src}/ggml/include", f"-I{src}/ggml/src",
         f"{src}/ggml/src/ggml-quants.c", str(tmp / "stubs.c"), "-lm", "-o", str(lib_path)],
        check=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(lib_path))
    T = gguf.GGMLQuantizationType
    lines = []
    for t, fn in ((T.Q4_K, "q4_K"), (T.Q5_K, "q5_K"), (T.Q6_K, "q6_K")):
        same = total = 0
        for x in tensors.values():
            x = np.ascontiguousarray(x, dtype=np.float32)
            ts = gguf.GGML_QUANT_SIZES[t][1]
            ref = np.zeros(x.size // 256 * ts, dtype=np.uint8)
            getattr(lib, f"quantize_row_{fn}_ref")(
                x.ctypes.data_as(ctypes.c_void_p),
                ref.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_int64(x.size),
            )
            mine = quantize(x, t).reshape(-1, ts)
            same += int((mine == ref.reshape(-1, ts)).all(1).sum())
            total += len(mine)
        lines.append(f"| {t.name} | {total} | {same} | {same / total:.6f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--c_reference", default=None)
    args = ap.parse_args()

    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.default_model import default_model_path
    from lora_alpaca.export.gguf import load_gguf_model, write_gguf
    from lora_alpaca.export.parity import (
        TOLERANCES,
        Tolerance,
        compare,
        parity_prompts,
        reference_outputs,
    )
    from lora_alpaca.export.quants import parse_gguf_types
    from lora_alpaca.prompts import load_template

    torch.manual_seed(0)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    template = load_template("alpaca")
    prompts = parity_prompts(template, None, args.prompts)
    refs = reference_outputs(model, tok, prompts)
    scale = max(float(r.logits.abs().max()) for r in refs)
    loose = Tolerance(atol=1e9, rtol=0.0, min_top1=0.0)  # measure, do not judge
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for qtype in parse_gguf_types(args.types):
            out = tmp / f"model-{qtype}.gguf"
            t0 = time.perf_counter()
            write_gguf(model, tok, template, out, qtype, "bench")
            write_s = time.perf_counter() - t0
            kinds: dict[str, int] = {}
            for t in gguf.GGUFReader(out).tensors:
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            back, _ = load_gguf_model(out)
            s = compare(refs, back, loose, tok.eos_token_id, qtype)
            del back
            tol = TOLERANCES.get(f"gguf-{qtype}")
            rows.append(
                {
                    "type": qtype,
                    "MB": out.stat().st_size / 1e6,
                    "write_s": write_s,
                    "max_dlogit": s["max_abs_logit_diff"],
                    "top1": s["top1_agreement"],
                    "greedy": [g["status"] for g in s["greedy"]],
                    "bound": tol.bound(scale) if tol else None,
                    "tensor_types": kinds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            out.unlink()
        print(f"\nSmolLM2-135M-Instruct, {len(refs)} prompts, "
              f"{refs and sum(len(r.ids) for r in refs)} positions, max |ref logit| {scale:.1f}")  # fmt: skip
        print("| type | file MB | write s | max abs dlogit | top-1 agreement | greedy (3 x 16 tok) "
              "| tensor types | current bound |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            same = sum(g == "identical" for g in r["greedy"])
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["tensor_types"].items()))
            bound = f"{r['bound']:.3g}" if r["bound"] is not None else "-"
            print(f"| {r['type']} | {r['MB']:.1f} | {r['write_s']:.1f} | {r['max_dlogit']:.3g} "
                  f"| {r['top1']:.4f} | {same}/{len(r['greedy'])} identical | {kinds} | {bound} |")  # fmt: skip
        if args.c_reference:
            state = model.state_dict()
            tensors = {k: v.numpy() for k, v in state.items() if k.endswith("mlp.down_proj.weight")}
            rng = np.random.default_rng(0)
            tensors["gaussian"] = rng.standard_normal((256, 1024)).astype(np.float32) * 0.02
            tensors["student-t3"] = rng.standard_t(3, (256, 1024)).astype(np.float32) * 0.02
            print("\n| type | blocks | byte-identical to ggml *_ref | share |\n|---|---|---|---|")
            for line in c_reference(Path(args.c_reference), tensors, tmp):
                print(line)


if __name__ == "__main__":
    main()
