"""Training throughput benchmark: the project's loop vs the plain padded recipe and trl, one process.

    python bench/bench_train.py                       # default workload (see BenchConfig)
    python bench/bench_train.py --rows 64 --val_rows 32 --batch_size 8

plain   = HF Trainer + DataCollatorForSeq2Seq (pad to the longest row of each micro-batch),
          fp32 on CPU / fp16 autocast on GPU, full logits, no packing: the alpaca-lora recipe.
project = lora_alpaca.train.loop.train_loop (the loop finetune.py runs) with the project's
          model loading (models.load_model / resolve_precision) and LoRA setup.
trl     = trl's SFTTrainer, padding_free=True, bf16=True where the CPU/GPU has bf16 units
          (--trl_bf16 auto; on a CPU without them bf16 matmuls are emulated at ~1/7 of fp32,
          and a user would pick fp32), on the same pre-tokenized rows (their
          labels column is used as is), model and LoRA given the documented way (a path +
          peft_config): the recipe a user would pick instead on CPU, with trl's default
          activation checkpointing (--trl_gradient_checkpointing false turns it off). trl is a bench-only
          install (`pip install trl`), not a dependency of the project.
All get the same tokenized rows, LoRA settings, optimizer steps, learning-rate schedule and
seed. Held-out loss is measured the same way for both: each run's LoRA weights on an fp32
copy of the base, fp32 compute, mean cross-entropy per supervised token.
Share of peak = real tok/s x 4 x (model parameters) FLOP (forward + backward through the
activations, no weight gradients) over the machine's matmul peak: the faster of a 2048^3 bf16
and a 2048^3 fp32 matmul (bf16 on AVX512-BF16 / AMX CPUs and GPUs, fp32 elsewhere), measured in the same
process before the recipes run (the issue's yardstick; attention FLOPs are not counted).
A markdown table goes to stdout and is appended to bench/results/<date>-<device>.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_alpaca import cli  # noqa: E402
from lora_alpaca.cli import field  # noqa: E402
from lora_alpaca.errors import UsageError  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data.json"


@dataclass
class BenchConfig:
    base_model: str | None = field(
        None, "Base model folder (default: the embedded SmolLM2-135M-Instruct)."
    )
    data: str = field(str(DEFAULT_DATA), "Alpaca-format JSON to sample rows from.")
    rows: int = field(512, "Training rows (one epoch over them).")
    val_rows: int = field(
        64, "Held-out rows for the after-run loss (disjoint from the training rows)."
    )
    cutoff_len: int = field(256, "Maximum tokens per row.")
    micro_batch_size: int = field(4, "Rows per forward pass.")
    batch_size: int = field(16, "Rows per optimizer step (steps = rows // batch_size).")
    learning_rate: float = field(
        3e-4, "Peak learning rate (linear decay, no warmup, both recipes)."
    )
    lora_r: int = field(8, "LoRA rank.")
    lora_alpha: int = field(16, "LoRA alpha.")
    lora_dropout: float = field(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = field(["q_proj", "v_proj"], "LoRA target modules.")
    dtype: str = field(
        "auto",
        "Project side dtype (auto = bf16 where the device has bf16 units).",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    packing: bool = field(True, "Project side: padding-free packed micro-batches.")
    loss_chunk_size: int = field(256, "Project side: chunked loss chunk (0 = full logits).")
    threads: int = field(0, "torch.set_num_threads for both recipes (0 = torch's default).")
    trl_bf16: str = field(
        "auto",
        "trl recipe: bf16=True (on), False (off), or auto = on where bf16 matmuls are native.",
        choices=["auto", "on", "off"],
    )
    trl_gradient_checkpointing: bool = field(
        True,
        "trl recipe: activation checkpointing, on by default as in trl's SFTConfig. Off "
        "measured the same speed here (2026-12-06: 227.5 vs 227.8 tok/s) with more memory.",
    )
    recipes: list[str] = field(
        ["plain", "trl", "project"], "Which recipes to run, in this order (plain, trl, project)."
    )
    seed: int = field(42, "Seed for row sampling, LoRA init, data order and dropout.")
    results_dir: str = field(
        str(ROOT / "bench" / "results"), "Folder for the <date>-<device>.md results file."
    )


# ---------------------------------------------------------------- data
def load_rows(cfg: BenchConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Sample train + held-out records (non-empty output) and tokenize them like finetune.py."""
    path = Path(cfg.data)
    if not path.is_file():
        raise UsageError(
            f"--data: no such file {cfg.data!r} (the Alpaca data lives in ../shared/data)"
        )
    records = [r for r in json.loads(path.read_text()) if str(r.get("output", "")).strip()]
    if len(records) < cfg.rows + cfg.val_rows:
        raise UsageError(
            f"--rows + --val_rows = {cfg.rows + cfg.val_rows} but {cfg.data} has {len(records)} usable rows"
        )
    random.Random(cfg.seed).shuffle(records)
    train, val = records[: cfg.rows], records[cfg.rows : cfg.rows + cfg.val_rows]
    return tokenize(cfg, train, tokenizer), tokenize(cfg, val, tokenizer)


def tokenize(cfg: BenchConfig, records: list[dict], tokenizer) -> list[dict]:
    # Same masking as finetune.py's defaults: prompt masked (-100), response + EOS trained,
    # rows cut to cutoff_len keeping the EOS. Hand-written so the bench does not depend on
    # the data module's options; both recipes get these exact rows.
    from lora_alpaca.prompts import load_template

    template, eos = load_template("alpaca"), tokenizer.eos_token_id
    rows = []
    for r in records:
        prompt = template.build_prompt(r["instruction"], r.get("input") or None)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + r["output"], add_special_tokens=False)["input_ids"]
        ids = ids[: cfg.cutoff_len - 1] + [eos]
        n_prompt = min(len(p_ids), len(ids) - 1)
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return rows


# ---------------------------------------------------------------- memory
class PeakMemory:
    """Peak RSS increase (CPU; via /proc/self/clear_refs) or max allocated (GPU) in a block."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(
            OSError
        ):  # give freed heap back so the previous run does not count
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        self.start = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.peak_mib = (peak - self.start) / 2**20


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


# ---------------------------------------------------------------- recipes
def lora_config(cfg: BenchConfig):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
    )


def trainer_arguments(cfg: BenchConfig, device: torch.device, name: str) -> dict:
    """The TrainingArguments both Trainer-based recipes share: same steps, schedule and seed."""
    return dict(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / name),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
        max_steps=cfg.rows // cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def run_plain(cfg: BenchConfig, ref, tokenizer, rows: list[dict], device: torch.device) -> dict:
    """HF Trainer + pad-to-longest collator, fp32 (fp16 autocast on GPU), full logits."""
    from datasets import Dataset
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    positions = {"real": 0, "total": 0}
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def counting_collator(features):
        batch = collate(features)
        positions["real"] += int(batch["attention_mask"].sum())
        positions["total"] += batch["attention_mask"].numel()
        return batch

    model = AutoModelForCausalLM.from_pretrained(
        ref.path, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lora_config(cfg))
    args = TrainingArguments(
        **trainer_arguments(cfg, device, "bench-plain"),
        fp16=device.type == "cuda",
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=counting_collator,
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trained = (cfg.rows // cfg.batch_size) * cfg.batch_size
    real = (
        sum(len(r["input_ids"]) for r in rows) * trained / len(rows)
    )  # Trainer's order is random; mean
    return {
        "wall_s": wall,
        "real_tokens": real,
        "share": positions["real"] / positions["total"],
        "lora": {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()},
    }


def run_trl(cfg: BenchConfig, ref, tokenizer, rows: list[dict], device: torch.device) -> dict:
    """trl SFTTrainer, padding-free, bf16 autocast, pre-tokenized rows (labels as given)."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **trainer_arguments(cfg, device, "bench-trl"),
        bf16=trl_bf16(cfg, device),
        padding_free=True,
        gradient_checkpointing=cfg.trl_gradient_checkpointing,
        max_length=None,  # rows are already cut to cutoff_len (trl refuses both with padding_free)
    )
    torch.manual_seed(cfg.seed)
    trainer = SFTTrainer(
        model=ref.path,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trained = (cfg.rows // cfg.batch_size) * cfg.batch_size
    real = sum(len(r["input_ids"]) for r in rows) * trained / len(rows)
    state = get_peft_model_state_dict(trainer.model)
    return {
        "wall_s": wall,
        "real_tokens": real,
        "share": 1.0,
        "precision": f"{next(trainer.model.parameters()).dtype} weights"
        + (", bf16 autocast" if args.bf16 else "")
        + (", activation checkpointing" if args.gradient_checkpointing else ", no checkpointing"),
        "lora": {k: v.detach().float().cpu() for k, v in state.items()},
    }


def count_parameters(ref) -> int:
    """Parameters of the base model (tied embeddings once), without loading its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ref.path))
    return sum(p.numel() for p in model.parameters())


def trl_bf16(cfg: BenchConfig, device: torch.device) -> bool:
    from lora_alpaca.models import bf16_supported

    return {"on": True, "off": False}.get(cfg.trl_bf16, bf16_supported(device))


def matmul_peak_gflops(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """FLOP/s of a 2048^3 matmul in `dtype` on this machine now (best of repeated runs)."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best, end, runs = 0.0, time.perf_counter() + seconds, 0
    while time.perf_counter() < end or runs < 2:  # emulated bf16 takes > 1 s a matmul
        runs += 1
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_peaks(when: str) -> dict[str, float]:
    return {f"{dtype} {when}": matmul_peak_gflops(getattr(torch, dtype))
            for dtype in ("bfloat16", "float32")}  # fmt: skip


def run_project(cfg: BenchConfig, ref, tokenizer, rows: list[dict], device: torch.device) -> dict:
    """lora_alpaca.train.loop.train_loop with the project's model loading and LoRA setup."""
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict

    from lora_alpaca.models import load_model, resolve_precision
    from lora_alpaca.train.config import FinetuneConfig
    from lora_alpaca.train.loop import epoch_windows, train_loop
    from lora_alpaca.train.lora_setup import add_lora

    # On CPU train_loop sets glibc to keep freed memory (train/cpu_memory.py), process-wide
    # and one-way: the reason the project runs after the other recipes.
    fcfg = FinetuneConfig(
        base_model=ref.path,
        quantization="none",
        dtype=cfg.dtype,
        cutoff_len=cfg.cutoff_len,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_target_modules=list(cfg.lora_target_modules),
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        num_epochs=1,
        max_steps=cfg.rows // cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=0,
        packing=cfg.packing,
        loss_chunk_size=cfg.loss_chunk_size,
        seed=cfg.seed,
        save_steps=0,
        logging_steps=10,
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-project"),
    )
    accelerator = Accelerator(cpu=device.type == "cpu")
    precision = resolve_precision(cfg.dtype, accelerator.device, "none")
    model = load_model(ref, precision, "none", accelerator.device)
    torch.manual_seed(cfg.seed)
    peft_model = add_lora(model, fcfg, quantized=False)
    t0 = time.perf_counter()
    pos = train_loop(
        fcfg,
        accelerator,
        peft_model,
        rows,
        [],
        precision,
        tokenizer.pad_token_id,
        "bench",
        None,
        lambda msg, bar=None: None,
    )
    wall = time.perf_counter() - t0
    lengths = [len(r["input_ids"]) for r in rows]
    real = total = 0
    for window in epoch_windows(len(rows), lengths, fcfg, 0)[: fcfg.max_steps]:
        for i in range(0, len(window), cfg.micro_batch_size):
            mb = [lengths[j] for j in window[i : i + cfg.micro_batch_size]]
            real, total = real + sum(mb), total + (sum(mb) if cfg.packing else max(mb) * len(mb))
    return {
        "wall_s": wall,
        "real_tokens": pos.tokens_seen,
        "share": real / total,
        "precision": precision.label,
        "lora": {
            k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_model).items()
        },
    }


def heldout_losses(
    cfg: BenchConfig, ref, val_rows: list[dict], loras: dict[str, dict]
) -> dict[str, float]:
    """Each run's LoRA weights on one fp32 base, fp32 compute; plus the untrained base."""
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from lora_alpaca.data.packing import pack_rows
    from lora_alpaca.train.loss import causal_lm_loss_sum

    base = AutoModelForCausalLM.from_pretrained(
        ref.path, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(base, lora_config(cfg)).eval()

    def mean_loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val_rows), cfg.micro_batch_size):
                loss, n = causal_lm_loss_sum(
                    model, pack_rows(val_rows[i : i + cfg.micro_batch_size])
                )
                total, count = total + loss.item(), count + n
        return total / count

    out = {}
    with model.disable_adapter():
        out["base"] = mean_loss()
    for name, state in loras.items():
        set_peft_model_state_dict(model, state)
        out[name] = mean_loss()
    return out


# ---------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        )
    if torch.cuda.is_available():
        cpu += f", GPU {torch.cuda.get_device_name()}"
    from lora_alpaca.models import bf16_supported

    native = "native" if bf16_supported(torch.device("cpu")) else "emulated"
    cpu += f" ({torch.backends.cpu.get_cpu_capability()}, bf16 matmuls {native})"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}; {os.cpu_count()} cores, torch {torch.__version__} using {torch.get_num_threads()} threads; load average {load}"


def report(
    cfg: BenchConfig,
    results: dict[str, dict],
    losses: dict[str, float],
    device: torch.device,
    peak: dict[str, float],
    n_params: int,
) -> str:
    head = (
        "| recipe | real tok/s | share of peak | real-token share | wall s | peak RSS MiB "
        "| held-out loss | vs plain | vs trl |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    rates = {name: r["real_tokens"] / r["wall_s"] for name, r in results.items()}
    flop_per_token = 4 * n_params
    best_peak = max(peak.values())
    for name, r in results.items():
        rate = rates[name]
        vs = [f"{rate / rates[o]:.2f}x" if o in rates else "-" for o in ("plain", "trl")]
        label = {
            "plain": "plain (HF Trainer, padded, fp32)",
            "trl": f"trl SFTTrainer (padding_free; {r.get('precision', '')})",
        }.get(
            name,
            f"project ({r.get('precision')}, packing {cfg.packing}, chunk {cfg.loss_chunk_size})",
        )
        lines.append(
            f"| {label} | {rate:.1f} | {rate * flop_per_token / 1e9 / best_peak:.1%} | {r['share']:.1%} "
            f"| {r['wall_s']:.1f} | {r['peak_mib']:.0f} | {losses[name]:.4f} | {vs[0]} | {vs[1]} |"
        )
    lines.append(f"| untrained base | | | | | | {losses['base']:.4f} | | |")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in peak.items())
    return (
        f"### {date} ({device.type})\n\n- machine: {machine()}\n- command: `{command}`\n"
        f"- workload: {cfg.rows} rows, {cfg.val_rows} held-out, cutoff {cfg.cutoff_len}, micro-batch "
        f"{cfg.micro_batch_size}, batch {cfg.batch_size} ({cfg.rows // cfg.batch_size} optimizer steps), "
        f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {','.join(cfg.lora_target_modules)}\n"
        f"- 2048^3 matmul GFLOP/s measured in this run: {peaks} (share of peak uses the best); "
        f"{n_params / 1e6:.1f}M parameters, 4N = {flop_per_token / 1e9:.2f} GFLOP per token\n"
        f"- peak RSS: growth of the process's peak RSS during that recipe (VmHWM reset before it)\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main(cfg: BenchConfig) -> int:
    from lora_alpaca.models import load_tokenizer, resolve_base_model

    if cfg.batch_size % cfg.micro_batch_size or cfg.rows < cfg.batch_size:
        raise UsageError("--batch_size must be a multiple of --micro_batch_size and <= --rows")
    unknown = set(cfg.recipes) - {"plain", "trl", "project"}
    if unknown:
        raise UsageError(f"--recipes: unknown {sorted(unknown)}; allowed: plain, trl, project")
    if "project" in cfg.recipes and cfg.recipes[-1] != "project":
        raise UsageError(
            "--recipes: project must come last (its allocator setting is process-wide)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(ref)
    train_rows, val_rows = load_rows(cfg, tokenizer)
    n_params = count_parameters(ref)
    peak = measure_peaks("before")
    runners = {"plain": run_plain, "trl": run_trl, "project": run_project}
    results = {}
    for name in cfg.recipes:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with PeakMemory(device) as mem:
            results[name] = runners[name](cfg, ref, tokenizer, train_rows, device)
        results[name]["peak_mib"] = mem.peak_mib
        gc.collect()
    peak.update(measure_peaks("after"))
    losses = heldout_losses(cfg, ref, val_rows, {k: v["lora"] for k, v in results.items()})
    text = report(cfg, results, losses, device, peak, n_params)
    print(text)
    out = Path(cfg.results_dir) / f"{datetime.date.today().isoformat()}-{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")
    print(f"appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(cli.build_command(BenchConfig, main, __doc__))
