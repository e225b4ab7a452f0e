"""How much of a training micro-step its GEMMs take, timed as the step runs them.

    python bench/gemm_share.py --steps 3 --rounds 8

For each micro-batch: the whole micro-step (bench/step_setup.py, as the loop runs it), then
a replay of only its frozen GEMMs with the same shapes: every decoder projection with its own
weight (forward x @ W.t() and the backward's grad @ W; cold in cache as in the step, which an
op-alone benchmark on one hot weight is not: there, a transposed copy of gate_proj's weight
ran 1.4-1.8x faster, in the 30 layers 0.99x) and the loss's lm_head matmuls chunk by chunk.
Then the 2048^3 bf16 GEMM, in the same process, between rounds. The step's "GFLOP/s" is the
replayed GEMMs' FLOPs (the issue's ~4N per token) over the whole step's time: the figure
bench_train.py calls share of peak. What the GEMMs do not explain is the rest of the step
(elementwise ops, attention, LoRA, casts, optimizer, Python).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_setup import StepConfig, setup_step  # noqa: E402

from lora_alpaca import cli  # noqa: E402
from lora_alpaca.cli import field  # noqa: E402
from lora_alpaca.errors import UsageError  # noqa: E402


@dataclass
class GemmShareConfig(StepConfig):
    steps: int = field(3, "Micro-batches (each its own number of tokens).")
    rounds: int = field(8, "Interleaved rounds of step, replay and peak.")

    def __post_init__(self):
        bad = [f"--{k} {v}" for k, v in (("steps", self.steps), ("rounds", self.rounds)) if v < 1]
        if bad:
            raise UsageError(f"{', '.join(bad)}: must be at least 1")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(cfg: GemmShareConfig) -> int:
    from bench_train import matmul_peak_gflops

    bench = setup_step(cfg, cfg.steps)
    base = bench.model.get_base_model()
    weights = [m.weight for m in base.model.layers.modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad]  # fmt: skip
    head = base.get_output_embeddings().weight
    dtype = weights[0].dtype
    chunk = bench.chunk or 1 << 30

    def replay_of(tokens: int):
        """The batch's frozen GEMMs, fwd + grad-input bwd, on fresh inputs of its shapes."""
        xs = {n: torch.randn(tokens, n, dtype=dtype) for w in weights for n in w.shape}
        starts = range(0, tokens, chunk)
        hs = [torch.randn(min(chunk, tokens - s), head.shape[1], dtype=dtype) for s in starts]
        gs = [torch.randn(h.shape[0], head.shape[0], dtype=dtype) for h in hs]
        flops = 4 * tokens * (sum(w.numel() for w in weights) + head.numel())

        def replay():
            for w in weights:
                F.linear(xs[w.shape[1]], w)
                xs[w.shape[0]] @ w
            for h, g in zip(hs, gs):  # the fused loss: logits, then dL/dh = dL/dlogits @ W
                F.linear(h, head)
                g @ head

        return replay, flops

    with torch.no_grad():
        replays = [replay_of(b["input_ids"].numel()) for b in bench.batches]
    steps, gemms, peaks = [[] for _ in bench.batches], [[] for _ in bench.batches], []
    for b in bench.batches:  # first-call costs
        bench.micro_step(b)
    for _ in range(cfg.rounds):
        for i, b in enumerate(bench.batches):
            steps[i].append(_seconds(lambda b=b: bench.micro_step(b)))
            with torch.no_grad():
                gemms[i].append(_seconds(replays[i][0]))
        peaks.append(matmul_peak_gflops(dtype, seconds=0.5))
    peak = max(peaks)
    print(f"# {bench.precision.label}, {cfg.rows} packed rows per micro-step, LoRA r={cfg.lora_r} on "
          f"{','.join(cfg.lora_target_modules)}, {torch.get_num_threads()} threads, best of "
          f"{cfg.rounds} interleaved rounds; 2048^3 {dtype} GEMM in the same rounds: "
          f"{min(peaks):.0f}-{peak:.0f} GFLOP/s")  # fmt: skip
    print("| tokens | whole step ms | its GEMMs ms | GEMMs GFLOP/s (share of peak) "
          "| step GFLOP/s (share of peak) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for b, (_, flops), st, ge in zip(bench.batches, replays, steps, gemms):
        s, g = min(st), min(ge)
        print(f"| {b['input_ids'].numel()} | {s * 1e3:.0f} | {g * 1e3:.0f} "
              f"| {flops / g / 1e9:.0f} ({flops / g / 1e9 / peak:.0%}) "
              f"| {flops / s / 1e9:.0f} ({flops / s / 1e9 / peak:.0%}) |")  # fmt: skip
    share = statistics.median(g / s for st, ge in zip(steps, gemms) for s, g in zip(st, ge))
    print(f"# GEMMs' share of the step, median over rounds and batches: {share:.0%}")
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(GemmShareConfig, main, __doc__))
