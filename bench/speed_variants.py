"""Each speed change of issue 20 on and off, in ONE process, interleaved (A B C A B C ...).

    OMP_NUM_THREADS=2 python bench/speed_variants.py               # SmolLM2, 4 packed rows
    python bench/speed_variants.py --rounds 3 --steps 4 --threads 1,2

A micro-step is bench/step_setup.py's: forward (the project's model, packed rows, chunked
loss) + backward + AdamW step, as lora_alpaca.train.loop runs it. Every variant trains on
the same micro-batches in every round, so on a shared machine the load hits all of them
alike; the per-variant tokens/s is the total over all rounds. The first variant is the
reference the others are divided by.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_setup import StepConfig, setup_step  # noqa: E402

from lora_alpaca import cli  # noqa: E402
from lora_alpaca.cli import field  # noqa: E402


@dataclass
class VariantsConfig(StepConfig):
    steps: int = field(3, "Micro-steps per variant per round (different batches).")
    rounds: int = field(2, "Rounds; variants are interleaved inside each round.")
    threads: list[str] = field(["0"], "torch thread counts to try (0 = torch's default).")
    variants: list[str] = field(
        ["all"], "Which variants: their 1-based numbers (as printed), or all."
    )


# name -> settings; `attention`: transformers' "sdpa" (masked over the pack) or the project's
# per-row function; `casts`: peft's fp32 cast of LoRA inputs; `recompute_last` / `checkpointed`:
# the chunked loss's old behaviours; `chunk`: loss chunk size (None = the config's);
# `cpu_dropout`: train/dropout.py's mask instead of nn.Dropout's.
BEFORE_ISSUE = dict(attention="sdpa", casts=True, recompute_last=True, checkpointed=True)
LAST_SESSION = dict(attention="packed", casts=False, recompute_last=False, checkpointed=True)
FUSED = dict(LAST_SESSION, checkpointed=False)
VARIANTS = {
    "before issue 20 (masked sdpa, LoRA input casts, every loss chunk recomputed)": BEFORE_ISSUE,
    "per-row attention, no input casts, last chunk kept (2026-12-02 01:00)": LAST_SESSION,
    "+ fused frozen-head loss (dL/dh in forward), chunk 256": FUSED,
    "+ fused frozen-head loss, chunk 1024": dict(FUSED, chunk=1024),
    "+ LoRA dropout from 64-bit draws (now)": dict(FUSED, cpu_dropout=True),
}


def main(cfg: VariantsConfig) -> int:
    from peft.tuners.lora import LoraLayer

    from lora_alpaca.train import loss as loss_mod
    from lora_alpaca.train.packed_attention import NAME

    bench = setup_step(cfg, cfg.steps)
    base = bench.model.get_base_model()
    lora_layers = [m for m in bench.model.modules() if isinstance(m, LoraLayer)]
    default_chunk = bench.chunk
    names = list(VARIANTS)
    if cfg.variants != ["all"]:
        names = [names[int(v) - 1] for v in cfg.variants]

    from torch import nn

    from lora_alpaca.train.dropout import CpuDropout

    drops = [d for m in lora_layers for d in m.lora_dropout.values() if isinstance(d, nn.Dropout)]

    def set_variant(attention, casts, recompute_last, checkpointed, chunk=None, cpu_dropout=False):
        for d in drops:  # same p, the other mask generator
            d.__class__ = CpuDropout if cpu_dropout else nn.Dropout
        base.set_attn_implementation(NAME if attention == "packed" else "sdpa")
        for m in lora_layers:
            m.cast_input_dtype_enabled = casts
        loss_mod._RECOMPUTE_LAST_CHUNK = recompute_last
        loss_mod._CHECKPOINTED_LOSS = checkpointed
        bench.chunk = chunk or default_chunk

    tokens = sum(b["input_ids"].numel() for b in bench.batches)
    print(f"# {bench.precision.label}, {cfg.rows} packed rows per micro-step, {tokens} tokens "
          f"per round per variant, LoRA r={cfg.lora_r} on {','.join(cfg.lora_target_modules)}")  # fmt: skip
    print("| threads | variant | tok/s | vs first |")
    print("|---|---|---|---|")
    for threads in map(int, cfg.threads):
        if threads:
            torch.set_num_threads(threads)
        set_variant(**VARIANTS[names[-1]])
        bench.micro_step(bench.batches[0])  # warm-up (allocator, first-call costs)
        secs = defaultdict(float)
        for _ in range(cfg.rounds):
            for name in names:
                set_variant(**VARIANTS[name])
                t0 = time.perf_counter()
                for b in bench.batches:
                    bench.micro_step(b)
                secs[name] += time.perf_counter() - t0
        first = tokens * cfg.rounds / secs[names[0]]
        for name in names:
            rate = tokens * cfg.rounds / secs[name]
            print(f"| {torch.get_num_threads()} | {name} | {rate:.1f} | {rate / first:.2f}x |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(VariantsConfig, main, __doc__))
