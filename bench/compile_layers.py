"""torch.compile of every decoder layer (attention core left eager) against eager, in ONE process.

    python bench/compile_layers.py                          # SmolLM2, 4 packed rows, LoRA dropout 0.05
    python bench/compile_layers.py --lora_dropout 0         # no dropout: no graph break in the MLP path
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python bench/compile_layers.py   # twice: cold, then warm cache

Issue 20 asked whether Inductor, fusing the ops between the GEMMs (norms, rotary, SiLU,
residual adds, casts), wins once its compile time is counted. Each decoder layer's forward is
wrapped in `torch.compile(dynamic=True)` (packed micro-batches change length every step); the
per-row attention (train/packed_attention.py: a Python loop over row lengths) and the LoRA
dropout (train/dropout.py: its int64 -> int16 view of the draws fails under AOT autograd's
aliasing in torch 2.13) are excluded with `torch.compiler.disable`, so each is a graph break.
The first micro-steps print their time (the compile), then eager and compiled run the same
micro-batches alternately, round by round (A B, B A, ...).
"""

from __future__ import annotations

import statistics
import sys
import time
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
class CompileConfig(StepConfig):
    steps: int = field(4, "Micro-batches per round (different lengths).")
    rounds: int = field(6, "Rounds; eager and compiled alternate inside each.")
    compiled_dropout: str = field(
        "cpu",
        "LoRA dropout in the compiled layers: cpu (train/dropout.py, left eager: a graph "
        "break) or torch (nn.Dropout, traced: Inductor draws its own mask in the fused kernel).",
        choices=["cpu", "torch"],
    )


def main(cfg: CompileConfig) -> int:
    from transformers import AttentionInterface

    from lora_alpaca.train import dropout, packed_attention

    bench = setup_step(cfg, cfg.steps)
    # What the compiled graphs must call, not trace (after setup_step: it registers the
    # attention function itself).
    AttentionInterface.register(
        packed_attention.NAME, torch.compiler.disable(packed_attention.packed_sdpa_forward)
    )
    dropout.CpuDropout.forward = torch.compiler.disable(dropout.CpuDropout.forward)
    layers = bench.model.get_base_model().model.layers
    eager = [layer.forward for layer in layers]
    compiled = [torch.compile(layer.forward, dynamic=True) for layer in layers]

    drops = [m for m in bench.model.modules() if isinstance(m, dropout.CpuDropout)]

    def use(on: bool) -> None:
        for layer, e, c in zip(layers, eager, compiled):
            layer.forward = c if on else e
        if cfg.compiled_dropout == "torch":  # same p; eager keeps the project's CpuDropout
            for d in drops:
                d.__class__ = torch.nn.Dropout if on else dropout.CpuDropout

    lengths = [int(b["input_ids"].numel()) for b in bench.batches]
    print(f"# {bench.precision.label}, {cfg.rows} packed rows per micro-step ({lengths} tokens), "
          f"LoRA r={cfg.lora_r} dropout {cfg.lora_dropout}, {torch.get_num_threads()} threads")  # fmt: skip
    use(True)
    for i, batch in enumerate(bench.batches):
        t0 = time.perf_counter()
        bench.micro_step(batch)
        print(f"compiled, micro-step {i} ({lengths[i]} tokens, includes any compile): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    use(False)
    bench.micro_step(bench.batches[0])  # eager's warm-up
    tokens = sum(lengths)
    secs: dict[bool, list[float]] = {False: [], True: []}
    for r in range(cfg.rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            use(on)
            t0 = time.perf_counter()
            for batch in bench.batches:
                bench.micro_step(batch)
            secs[on].append(time.perf_counter() - t0)
    rate = {on: tokens * cfg.rounds / sum(s) for on, s in secs.items()}
    paired = statistics.median(e / c for e, c in zip(secs[False], secs[True]))
    print(f"| eager tok/s | compiled tok/s | compiled vs eager | paired (median of rounds) |\n"
          f"|---|---|---|---|\n"
          f"| {rate[False]:.1f} | {rate[True]:.1f} | {rate[True] / rate[False]:.3f}x | {paired:.3f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(CompileConfig, main, __doc__))
