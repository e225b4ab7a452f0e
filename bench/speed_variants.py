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

import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_setup import StepConfig, setup_step  # noqa: E402

from lora_alpaca import cli  # noqa: E402
from lora_alpaca.cli import field  # noqa: E402
from lora_alpaca.train.dropout import CpuDropout, keep_mask, keep_scale  # noqa: E402
from lora_alpaca.train.packed_attention import _causal_bias  # noqa: E402


@dataclass
class VariantsConfig(StepConfig):
    steps: int = field(3, "Micro-steps per variant per round (different batches).")
    rounds: int = field(2, "Rounds; variants are interleaved inside each round.")
    threads: list[str] = field(["0"], "torch thread counts to try (0 = torch's default).")
    variants: list[str] = field(
        ["all"], "Which variants: their 1-based numbers (as printed), or all."
    )


# name -> settings; `attention`: transformers' "sdpa" (masked over the pack), the project's
# per-row function ("packed"), or that function as it was before 2026-12-02 16:00
# ("packed_fp32_scores": scores cast to fp32, scaled, masked, softmaxed, cast back) or before
# 2026-12-03 ("packed_masked_fill": the bool mask applied by masked_fill) or before
# 2026-12-03 19:00 ("packed_sliced": a slice per row, GQA by a broadcasting matmul); `casts`:
# peft's fp32 cast of LoRA inputs; `loss`: the chunked loss's path ("fused" frozen-head,
# "fused_allocating": the same with fresh [chunk, vocab] buffers every micro-step instead of
# the kept ones; "checkpointed" every chunk but the last; "recompute_all"); `chunk`: loss chunk size
# (None = the config's); `cpu_dropout`: train/dropout.py's mask instead of nn.Dropout's
# ("where": applied with torch.where and the bool mask, as before 2026-12-03).
BEFORE_ISSUE = dict(attention="sdpa", casts=True, loss="recompute_all")
LAST_SESSION = dict(attention="packed_fp32_scores", casts=False, loss="checkpointed")
FUSED = dict(LAST_SESSION, loss="fused_allocating")
NOW = dict(FUSED, attention="packed_masked_fill", loss="fused", cpu_dropout=True)
VARIANTS = {
    "before issue 20 (masked sdpa, LoRA input casts, every loss chunk recomputed)": BEFORE_ISSUE,
    "per-row attention, no input casts, last chunk kept (2026-12-02 01:00)": LAST_SESSION,
    "+ fused frozen-head loss (dL/dh in forward) (2026-12-02 09:00)": FUSED,
    "+ attention scores kept in bf16, scale on q": dict(
        NOW, loss="fused_allocating", cpu_dropout=False
    ),
    "+ loss buffers kept between micro-steps": dict(NOW, cpu_dropout=False),
    "+ LoRA dropout from 64-bit draws (2026-12-02 20:00)": dict(NOW, cpu_dropout="where"),
    "+ dropout by a 0/1 multiply, no bool ops": NOW,
    "+ causal mask added as a 0/-inf bias, no masked_fill": dict(NOW, attention="packed_sliced"),
    "+ rows split (one cat in backward), GQA as one bmm per row (now)": dict(
        NOW, attention="packed"
    ),
}


def rows_attention_masked_fill(query, key, value, lengths, dropout, scaling, training,
                               fp32_scores=False, bias=False):  # fmt: skip
    """packed_attention._rows_attention before 2026-12-03 (fp32_scores: before 2026-12-02
    16:00; bias: the cached 0/-inf bias in place of masked_fill, before 2026-12-03 19:00),
    for the comparison."""
    import torch.nn.functional as F

    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    if not fp32_scores:
        query = query * scale
    outs, start = [], 0
    for n in lengths:
        q = query[:, :, start : start + n].reshape(1, kv_heads, groups, n, dim)
        k = key[:, :, start : start + n].unsqueeze(2)
        v = value[:, :, start : start + n].unsqueeze(2)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if fp32_scores:
            scores = scores.float() * scale
        if n > 1 and bias:
            scores.add_(_causal_bias(n, scores.device, scores.dtype))
        elif n > 1:
            future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = scores.softmax(-1).to(v.dtype)
        if dropout and training:
            probs = F.dropout(probs, p=dropout)
        outs.append(torch.matmul(probs, v).reshape(1, heads, n, dim))
        start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def _cpu_times() -> list[int]:
    """Jiffies of /proc/stat's `cpu` line (user nice system idle iowait irq softirq steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return [0] * 8


def _steal_share(before: list[int], after: list[int]) -> float:
    """Share of the CPU time the hypervisor gave to other guests (steal) between two reads."""
    diff = [b - a for a, b in zip(before, after)]
    return diff[7] / sum(diff) if sum(diff) else 0.0


class WhereDropout(CpuDropout):
    """train/dropout.py's CpuDropout before 2026-12-03: torch.where with the bool mask."""

    def forward(self, x):
        return torch.where(keep_mask(x.shape, self.p), x * keep_scale(self.p), 0.0)


def main(cfg: VariantsConfig) -> int:
    from peft.tuners.lora import LoraLayer

    from lora_alpaca.train import loss as loss_mod
    from lora_alpaca.train import packed_attention
    from lora_alpaca.train.packed_attention import NAME

    bench = setup_step(cfg, cfg.steps)
    base = bench.model.get_base_model()
    lora_layers = [m for m in bench.model.modules() if isinstance(m, LoraLayer)]
    default_chunk = bench.chunk
    names = list(VARIANTS)
    if cfg.variants != ["all"]:
        names = [names[int(v) - 1] for v in cfg.variants]

    from torch import nn

    dropout_class = {"where": WhereDropout, True: CpuDropout, False: nn.Dropout}
    rows_attention_of = {
        "packed_fp32_scores": partial(rows_attention_masked_fill, fp32_scores=True),
        "packed_masked_fill": rows_attention_masked_fill,
        "packed_sliced": partial(rows_attention_masked_fill, bias=True),
    }
    drops = [d for m in lora_layers for d in m.lora_dropout.values() if isinstance(d, nn.Dropout)]
    rows_attention = packed_attention._rows_attention
    kept_buffer = loss_mod._chunk_buffer

    def fresh_buffer(name, rows, cols, dtype, device):
        return torch.empty(rows, cols, dtype=dtype, device=device)

    def set_variant(attention, casts, loss, chunk=None, cpu_dropout=False):
        for d in drops:  # same p, the other mask generator
            d.__class__ = dropout_class[cpu_dropout]
        base.set_attn_implementation("sdpa" if attention == "sdpa" else NAME)
        packed_attention._rows_attention = rows_attention_of.get(attention, rows_attention)
        for m in lora_layers:
            m.cast_input_dtype_enabled = casts
        loss_mod._BENCH_LOSS_PATH = None if loss.startswith("fused") else loss
        loss_mod._chunk_buffer = fresh_buffer if loss == "fused_allocating" else kept_buffer
        bench.chunk = chunk or default_chunk

    tokens = sum(b["input_ids"].numel() for b in bench.batches)
    print(f"# {bench.precision.label}, {cfg.rows} packed rows per micro-step, {tokens} tokens "
          f"per round per variant, LoRA r={cfg.lora_r} on {','.join(cfg.lora_target_modules)}")  # fmt: skip
    # "best round": tokens / the fastest round's seconds. On a shared VM whose neighbours come
    # and go, a slow round is the neighbours; the fastest is the closest to the code's speed.
    # "paired": the median over rounds of (first variant's seconds / this one's) in the same
    # round; neighbours' load drifts slowly, so a ratio inside one round mostly cancels it.
    print("| threads | variant | tok/s | vs first | best round tok/s | vs first | paired |")
    print("|---|---|---|---|---|---|---|")
    for threads in map(int, cfg.threads):
        if threads:
            torch.set_num_threads(threads)
        set_variant(**VARIANTS[names[-1]])
        bench.micro_step(bench.batches[0])  # warm-up (allocator, first-call costs)
        secs = defaultdict(list)
        cpu_before = _cpu_times()
        for _ in range(cfg.rounds):
            for name in names:
                set_variant(**VARIANTS[name])
                t0 = time.perf_counter()
                for b in bench.batches:
                    bench.micro_step(b)
                secs[name].append(time.perf_counter() - t0)
        steal = _steal_share(cpu_before, _cpu_times())
        first = tokens * cfg.rounds / sum(secs[names[0]])
        best_first = tokens / min(secs[names[0]])
        for name in names:
            rate, best = tokens * cfg.rounds / sum(secs[name]), tokens / min(secs[name])
            paired = statistics.median(a / b for a, b in zip(secs[names[0]], secs[name]))
            print(f"| {torch.get_num_threads()} | {name} | {rate:.1f} | {rate / first:.2f}x "
                  f"| {best:.1f} | {best / best_first:.2f}x | {paired:.3f}x |",
                  flush=True)  # fmt: skip
        print(f"# {torch.get_num_threads()} threads: CPU time stolen by the hypervisor over these "
              f"rounds {100 * steal:.1f}% (/proc/stat; noise beyond this is other load)")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(VariantsConfig, main, __doc__))
