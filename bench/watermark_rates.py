"""Watermark detection rates on SmolLM2-135M-Instruct (CPU): N Alpaca instructions answered
with and without the watermark, then scored at the detector's threshold: watermarked, plain,
wrong key, word-level edits (a crude paraphrase), and answers cut short. Also the same
watermark applied through generation_config.watermarking_config (after top-k/top-p), to show
why the engine passes the processor before them.

python bench/watermark_rates.py --n 32 --out bench/results/watermark_rates.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_alpaca.generate.engine import DecodingSettings  # noqa: E402
from lora_alpaca.generate.loading import LoadRequest, load_generator  # noqa: E402
from lora_alpaca.safeguards.detect import Detector  # noqa: E402
from lora_alpaca.safeguards.guard import Safeguards  # noqa: E402
from lora_alpaca.safeguards.watermark import WatermarkSettings  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data.json"


def edit_words(text: str, share: float, rng: random.Random) -> str:
    """Delete or duplicate-swap `share` of the words: what light paraphrasing does to tokens."""
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        if r < share / 2:
            continue  # dropped
        if r < share and out:
            out.insert(len(out) - 1, w)  # swapped with the previous word
            continue
        out.append(w)
    return " ".join(out)


def rates(det: Detector, texts: list[str]) -> dict:
    scored = [det.score(t) for t in texts]
    judged = [s for s in scored if s["prediction"] is not None]
    zs = [s["z_score"] for s in judged]
    return {
        "detected": sum(s["prediction"] for s in judged),
        "judged": len(judged),
        "too_short": len(scored) - len(judged),
        "rate": round(sum(s["prediction"] for s in judged) / max(1, len(judged)), 3),
        "median_z": round(statistics.median(zs), 2) if zs else None,
        "median_tokens": statistics.median(s["num_tokens_scored"] for s in scored),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "watermark_rates.json"))
    args = ap.parse_args()
    rows = [r for r in json.loads(ALPACA.read_text()) if not r["input"]]
    rows = random.Random(0).sample(rows, args.n)
    gen = load_generator(LoadRequest(device="cpu")).generator
    prompts = [gen.prompt_for(r["instruction"]) for r in rows]
    key = WatermarkSettings(random.Random(1).getrandbits(63))
    # generate.py --mode sample defaults: temperature 0.7, top_p 0.9, top_k 40
    settings = DecodingSettings("sample", max_new_tokens=args.max_new_tokens, seed=0)

    def answer(guard) -> tuple[list[str], float]:
        gen.safeguards, t0, texts = guard, time.perf_counter(), []
        for i in range(0, len(prompts), args.batch_size):
            texts += [r.text for r in gen.generate(prompts[i : i + args.batch_size], settings)]
        gen.safeguards = None
        return texts, time.perf_counter() - t0

    marked, t_marked = answer(Safeguards(watermark=key))
    plain, t_plain = answer(None)
    # The library's own route: watermarking_config in the GenerationConfig (after top-k/top-p).
    import lora_alpaca.generate.engine as g

    original = g.build_generation_config

    def with_config(*a, **k):
        c = original(*a, **k)
        c.watermarking_config = key.transformers_config()
        return c

    g.build_generation_config = with_config
    after_topp, _ = answer(None)
    g.build_generation_config = original

    det = Detector(gen.model.config, gen.tokenizer, key)
    wrong = Detector(gen.model.config, gen.tokenizer, WatermarkSettings(key.hashing_key + 1))
    rng = random.Random(2)
    tok = gen.tokenizer

    def first_tokens(t: str, n: int) -> str:
        return tok.decode(tok(t, add_special_tokens=False)["input_ids"][:n])

    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (bf16, CPU)",
            "prompts": f"{args.n} Alpaca instructions without input (random.Random(0))",
            "decoding": "sample, temperature 0.7, top_p 0.9, top_k 40 (generate.py defaults)",
            "max_new_tokens": args.max_new_tokens,
            "watermark": "greenlist_ratio 0.25, bias 2.0, lefthash, context 1",
            "z_threshold": det.z_threshold,
            "min_tokens": det.min_tokens,
            "date": time.strftime("%Y-%m-%d"),
        },
        "watermarked": rates(det, marked),
        "unwatermarked": rates(det, plain),
        "wrong_key": rates(wrong, marked),
        "edits_10pct_words": rates(det, [edit_words(t, 0.1, rng) for t in marked]),
        "edits_30pct_words": rates(det, [edit_words(t, 0.3, rng) for t in marked]),
        "first_25_tokens": rates(det, [first_tokens(t, 25) for t in marked]),
        "first_50_tokens": rates(det, [first_tokens(t, 50) for t in marked]),
        "library_route_after_top_p": rates(det, after_topp),
        "seconds": {"watermarked": round(t_marked, 1), "plain": round(t_plain, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
