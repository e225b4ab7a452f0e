"""Each speed change of issue 20 on and off, in ONE process, interleaved (A B C A B C ...).

    OMP_NUM_THREADS=2 python bench/speed_variants.py               # SmolLM2, 4 packed rows
    python bench/speed_variants.py --rounds 3 --steps 4 --threads 1 2

A micro-step = forward (bf16 base + LoRA under autocast, packed rows, chunked loss) +
backward + AdamW step, as lora_alpaca.train.loop runs it. Every variant trains on the same
micro-batches in every round, so on a shared machine the load hits all of them alike; the
per-variant tokens/s is the total over all rounds. `before` is the project before issue 20:
transformers' sdpa with the block-diagonal mask over the whole pack, peft's fp32 cast of
each LoRA input, the last loss chunk recomputed in backward.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_alpaca import cli  # noqa: E402
from lora_alpaca.cli import field  # noqa: E402


@dataclass
class VariantsConfig:
    base_model: str | None = field(None, "Base model folder (default: SmolLM2-135M-Instruct).")
    rows: int = field(4, "Rows per micro-batch (packed into one sequence).")
    cutoff_len: int = field(256, "Maximum tokens per row.")
    lora_r: int = field(8, "LoRA rank.")
    lora_target_modules: list[str] = field(["q_proj", "v_proj"], "LoRA target modules.")
    steps: int = field(3, "Micro-steps per variant per round (different batches).")
    rounds: int = field(2, "Rounds; variants are interleaved inside each round.")
    threads: list[str] = field(["0"], "torch thread counts to try (0 = torch's default).")
    seed: int = field(42, "Row sampling seed.")


# name -> (packed attention, skip LoRA input casts, keep the last loss chunk)
VARIANTS = {
    "before": (False, False, False),
    "+ packed attention": (True, False, False),
    "+ no LoRA input casts": (False, True, False),
    "+ last chunk kept": (False, False, True),
    "all three (default now)": (True, True, True),
}


def main(cfg: VariantsConfig) -> int:
    from accelerate import Accelerator
    from bench_train import BenchConfig, load_rows
    from peft.tuners.lora import LoraLayer

    from lora_alpaca.data.packing import pack_rows
    from lora_alpaca.models import load_model, load_tokenizer, resolve_base_model, resolve_precision
    from lora_alpaca.train import loss as loss_mod
    from lora_alpaca.train.config import FinetuneConfig
    from lora_alpaca.train.lora_setup import add_lora
    from lora_alpaca.train.packed_attention import NAME

    ref = resolve_base_model(cfg.base_model)
    tok = load_tokenizer(ref)
    bcfg = BenchConfig(
        rows=cfg.rows * cfg.steps, val_rows=0, cutoff_len=cfg.cutoff_len, seed=cfg.seed
    )
    rows, _ = load_rows(bcfg, tok)
    batches = [pack_rows(rows[i : i + cfg.rows]) for i in range(0, len(rows), cfg.rows)]
    fcfg = FinetuneConfig(base_model=ref.path, lora_r=cfg.lora_r, packing=True,
                          lora_target_modules=list(cfg.lora_target_modules), output_dir="/tmp/x")  # fmt: skip
    device = Accelerator(cpu=True).device
    precision = resolve_precision("auto", device, "none")
    model = add_lora(load_model(ref, precision, "none", device), fcfg, quantized=False).train()
    base = model.get_base_model()
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    autocast = (lambda: torch.autocast("cpu", dtype=precision.autocast)) if precision.autocast \
        else contextlib.nullcontext  # fmt: skip

    def set_variant(packed, no_casts, keep_last):
        base.set_attn_implementation(NAME if packed else "sdpa")
        for m in lora_layers:
            m.cast_input_dtype_enabled = not no_casts
        loss_mod._RECOMPUTE_LAST_CHUNK = not keep_last

    def micro_step(batch):
        with autocast():
            loss, n = loss_mod.causal_lm_loss_sum(model, batch, 256)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(f"# {precision.label}, {cfg.rows} packed rows per micro-step, "
          f"{sum(b['input_ids'].numel() for b in batches)} tokens per round per variant")  # fmt: skip
    print("| threads | variant | tok/s | vs before |")
    print("|---|---|---|---|")
    for threads in map(int, cfg.threads):
        if threads:
            torch.set_num_threads(threads)
        set_variant(True, True, True)
        micro_step(batches[0])  # warm-up (allocator, first-call costs)
        secs, toks = defaultdict(float), defaultdict(int)
        for _ in range(cfg.rounds):
            for name, flags in VARIANTS.items():
                set_variant(*flags)
                t0 = time.perf_counter()
                for b in batches:
                    micro_step(b)
                secs[name] += time.perf_counter() - t0
                toks[name] += sum(b["input_ids"].numel() for b in batches)
        before = toks["before"] / secs["before"]
        for name in VARIANTS:
            rate = toks[name] / secs[name]
            print(
                f"| {torch.get_num_threads()} | {name} | {rate:.1f} | {rate / before:.2f}x |",
                flush=True,
            )
    set_variant(True, True, True)
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(VariantsConfig, main, __doc__))
