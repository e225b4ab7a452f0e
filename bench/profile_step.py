"""Where the time of one training micro-step goes: torch.profiler, grouped by kind of op.

    OMP_NUM_THREADS=2 python bench/profile_step.py            # SmolLM2, 4 Alpaca rows packed
    python bench/profile_step.py --steps 3 --top 40           # also the raw top-40 op table
    python bench/profile_step.py --steps 3 --by_shape 60      # top 60 (op, input shapes) pairs

One micro-step = the project's forward (bf16 frozen base + LoRA under autocast, packed rows,
chunked loss) + backward + AdamW step, exactly as lora_alpaca.train.loop runs it. Warm-up
steps run first; then `--steps` steps run under the profiler and the self CPU time of every
op is put in one bucket (projections, attention, LoRA, loss, casts, ...). "Python / other"
is wall time not inside any profiled op: interpreter, module hooks, autograd bookkeeping.
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
class ProfileConfig(StepConfig):
    warmup: int = field(2, "Unprofiled steps first (the profiled batches also run once before).")
    steps: int = field(3, "Profiled steps.")
    top: int = field(0, "Also print the top-N ops by self CPU time (0 = no).")
    by_shape: int = field(
        0, "Also print the top-N (op, input shapes) pairs by self CPU time (0 = no)."
    )


# Bucket of an op, by name and input shapes (forward and backward alike: a LoRA matmul has
# the rank as one dimension, an lm_head matmul the vocabulary), or by an enclosing scope.
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
CASTS = ("aten::_to_copy", "aten::copy_", "aten::to", "aten::_copy_from")


def bucket(name: str, shapes: list, scope: str, rank: int, vocab: int) -> str:
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s if isinstance(d, int)}
    if scope == "optimizer" or name.startswith("Optimizer."):
        return "optimizer (AdamW, grad clip, zero_grad)"
    if vocab in dims or any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return "loss: lm_head matmuls (fwd, recompute, bwd) + cross-entropy"
    if name in CASTS:
        return "dtype casts / copies (autocast, fp32<->bf16)"
    # Per-row attention (train/packed_attention.py) is bmm + softmax + masked_fill; the
    # projections and LoRA are 2-D mm / addmm, so a bmm is attention in forward and backward.
    if (
        scope == "attention"
        or name == "aten::bmm"
        or any(k in name for k in ("attention", "sdpa", "flash", "_softmax", "masked_fill"))
    ):
        return "attention (per row of the pack: bmm, softmax, mask)"
    if scope == "mask" or name in (
        "aten::eq",
        "aten::__and__",
        "aten::bitwise_and",
        "aten::le",
        "aten::ge",
        "aten::lt",
        "aten::gt",
    ):
        return "mask building / comparisons"
    if name in MATMULS and rank in dims:
        return "LoRA matmuls (A, B; fwd + bwd)"
    if scope == "lora" or (
        name
        in (
            "aten::mul",
            "aten::add",
            "aten::add_",
            "aten::bernoulli_",
            "aten::native_dropout",
            "aten::native_dropout_backward",
            "aten::div_",
        )
        and scope == "lora"
    ):
        return "LoRA dropout / scale / adds"
    if name in MATMULS:
        return "base projections q,k,v,o + MLP (fwd + bwd)"
    return "elementwise: norms, rotary, SiLU, adds, grad accumulation, views"


def main(cfg: ProfileConfig) -> int:
    from peft.tuners.lora import LoraLayer
    from torch.profiler import ProfilerActivity, profile, record_function

    from lora_alpaca.train import packed_attention

    bench = setup_step(cfg, cfg.warmup + cfg.steps)
    model, precision = bench.model, bench.precision

    # Scope LoRA adapter sub-modules and attention so their ops are attributed to them.
    def scoped(mod, label):
        fwd = mod.forward

        def wrapped(*a, **k):
            with record_function(f"scope::{label}"):
                return fwd(*a, **k)

        mod.forward = wrapped

    rows_attention = packed_attention._rows_attention

    def scoped_attention(*a, **k):
        with record_function("scope::attention"):
            return rows_attention(*a, **k)

    packed_attention._rows_attention = scoped_attention  # looked up by name at each call
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for d in (m.lora_A, m.lora_B, m.lora_dropout):
                for sub in d.values():
                    scoped(sub, "lora")

    def step(i):
        return bench.micro_step(bench.batches[i], lambda: record_function("scope::optimizer"))

    # Every profiled batch also runs once unprofiled first: a batch longer than any before it
    # grows the heap, and its first step pays page faults in every op (measured: SiLU 1.7 ms
    # a call then, 0.14 ms after), which is not what a training run's steady state costs.
    for i in range(cfg.warmup + cfg.steps):
        step(i)
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for i in range(cfg.warmup, cfg.warmup + cfg.steps):
            tokens += step(i)
        wall = time.perf_counter() - t0

    vocab = model.get_output_embeddings().weight.shape[0]
    totals: dict[str, float] = defaultdict(float)

    def scope_of(e) -> str:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("scope::"):
                return p.name.split("::", 1)[1]
            if p.name.startswith("Optimizer."):
                return "optimizer"
            p = p.cpu_parent
        return ""

    in_ops = 0.0
    for e in prof.events():
        self_us = e.self_cpu_time_total
        if self_us <= 0 or e.name.startswith("scope::"):
            continue
        totals[bucket(e.name, e.input_shapes or [], scope_of(e), cfg.lora_r, vocab)] += self_us
        in_ops += self_us
    n_threads = torch.get_num_threads()
    wall_us = wall * 1e6
    print(f"# profile: {cfg.steps} micro-steps of {cfg.rows} packed rows, {tokens} tokens, "
          f"{precision.label}, LoRA r={cfg.lora_r} on {','.join(cfg.lora_target_modules)}, "
          f"chunk {cfg.loss_chunk_size}, {n_threads} threads")  # fmt: skip
    print(f"# wall {wall:.2f} s under the profiler = {tokens / wall:.0f} tok/s "
          "(the profiler itself costs some %)\n")  # fmt: skip
    print("| bucket | self CPU ms / step | share of op time |")
    print("|---|---|---|")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / 1e3 / cfg.steps:.1f} | {v / in_ops:.1%} |")
    print(
        f"| all ops (self CPU, summed over threads' op calls) | {in_ops / 1e3 / cfg.steps:.1f} | 100% |"
    )
    print(f"| wall time per step | {wall_us / 1e3 / cfg.steps:.1f} | |")
    if cfg.top:
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=cfg.top))
    if cfg.by_shape:
        # Which call sites an op's time comes from: the same op on different shapes is usually
        # a different place in the step (a weight cast vs an activation cast).
        rows = [
            a for a in prof.key_averages(group_by_input_shape=True) if a.key.startswith("aten::")
        ]
        rows.sort(key=lambda a: -a.self_cpu_time_total)
        print("\n| op | input shapes | calls / step | self CPU ms / step |\n|---|---|---|---|")
        for a in rows[: cfg.by_shape]:
            print(f"| {a.key} | {a.input_shapes} | {a.count / cfg.steps:.0f} | "
                  f"{a.self_cpu_time_total / 1e3 / cfg.steps:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(ProfileConfig, main, __doc__))
