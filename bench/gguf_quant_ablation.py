"""Diagnostic: which 32-block type drifts most on a merged adapter, one type at a time.

Merges --lora_weights into its base (fp32), rounds every linear projection through one
ggml type (the gguf package's quantize + dequantize; embeddings and norms untouched) and
compares logits with the unrounded merge on the first --prompts parity prompts of an
export's parity.json (or the built-in ones). Written to explain why q5_k_m (mostly Q5_1 on
SmolLM2's 576-wide rows) drifted more than q4_k_m (mostly Q5_0): see BENCHMARKS.md.

    python bench/gguf_quant_ablation.py --lora_weights out/quickstart [--types Q5_0,Q5_1,Q4_1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora_weights", required=True)
    ap.add_argument("--types", default="Q5_0,Q5_1,Q4_1,Q8_0")
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()

    import gguf
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.export.parity import parity_prompts
    from lora_alpaca.prompts import load_template

    manifest = json.loads((Path(args.lora_weights) / "lora_alpaca.json").read_text())
    base_path = manifest["base_model"]["path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.lora_weights).merge_and_unload().eval()
    prompts = parity_prompts(load_template("alpaca"), None, args.prompts)
    ids = [torch.tensor([tok(p)["input_ids"]]) for p in prompts]
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = [model(input_ids=i).logits[0] for i in ids]
    print(f"{len(prompts)} prompts; max |ref logit| {max(float(r.abs().max()) for r in ref):.1f}")
    print("| type on every *_proj.weight | rel RMS weight error | max abs dlogit | top-1 |")
    print("|---|---|---|---|")
    for name in args.types.split(","):
        t = gguf.GGMLQuantizationType[name]
        rounded, errs = {}, []
        for k, v in exact.items():
            if not k.endswith("proj.weight"):
                rounded[k] = v
                continue
            a = v.numpy()
            back = gguf.quants.dequantize(gguf.quants.quantize(a, t), t).reshape(a.shape)
            errs.append(np.sqrt(np.mean((back - a) ** 2) / np.mean(a**2)))
            rounded[k] = torch.from_numpy(back)
        model.load_state_dict(rounded)
        with torch.no_grad():
            got = [model(input_ids=i).logits[0] for i in ids]
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True))
        top1 = np.mean(
            np.concatenate(
                [(g.argmax(-1) == r.argmax(-1)).numpy() for g, r in zip(got, ref, strict=True)]
            )
        )
        print(f"| {name} | {np.mean(errs):.4f} | {diff:.3g} | {top1:.4f} |", flush=True)


if __name__ == "__main__":
    main()
