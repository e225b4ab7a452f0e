"""generate_instruction.py's flags: the single source of defaults and `--help`.

Defaults are Stanford Alpaca's (generate_instruction.py and its OpenAI decoding arguments).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_alpaca.cli import field
from lora_alpaca.errors import UsageError

APIS = ["chat", "completions"]
# What a resumed run must share with the run that started the folder (the rest may change).
RECIPE_FIELDS = (
    "api",
    "model",
    "teacher_model",
    "num_prompt_instructions",
    "request_batch_size",
    "temperature",
    "top_p",
    "max_tokens",
    "similarity_threshold",
    "seed",
)


@dataclass
class SelfInstructConfig:
    api_base: str | None = field(
        None,
        "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (generate.py --api, llama.cpp, vLLM, Ollama, a hosted API). The key comes from OPENAI_API_KEY.",
    )
    model: str | None = field(None, "Model name the endpoint serves (with --api_base).")
    api: str = field(
        "chat",
        "chat: /chat/completions (instruct models); completions: /completions (base models continue the prompt).",
        choices=APIS,
    )
    teacher_model: str | None = field(
        None,
        "Instead of an endpoint: a local model folder, .gguf or hub id, loaded through the project's generation engine.",
    )
    output_dir: str = field(
        "out/selfinstruct",
        "Folder for regen.json, alpaca_data.json, state.json and the report. Never overwritten: use --resume to continue it.",
    )
    resume: bool = field(
        False, "Continue the run in --output_dir (a larger --num_instructions_to_generate is fine)."
    )
    seed_tasks: str | None = field(
        None,
        "Seed tasks: self-instruct seed_tasks.jsonl rows or Alpaca rows (.json/.jsonl). Default: the 40 tasks shipped with lora-alpaca.",
    )
    num_instructions_to_generate: int = field(100, "Stop once this many tasks are kept.")
    num_prompt_instructions: int = field(3, "Seed tasks shown as examples in each request.")
    request_batch_size: int = field(5, "Requests per round (state is saved after every round).")
    temperature: float = field(1.0, "Teacher sampling temperature.")
    top_p: float = field(1.0, "Teacher nucleus sampling mass.")
    max_tokens: int = field(
        3072, "Most tokens per teacher answer (the last task is dropped when cut)."
    )
    similarity_threshold: float = field(
        0.7, "Reject a task whose ROUGE-L to a seed or kept instruction is above this."
    )
    seed: int = field(42, "Random seed: which seed tasks each request shows, and request seeds.")
    max_concurrency: int = field(5, "Requests in flight at once (endpoint teachers).")
    max_retries: int = field(
        5, "Retries with exponential backoff on 429, 5xx and lost connections."
    )
    request_timeout: float = field(600.0, "Seconds to wait for one teacher answer.")
    max_rounds_without_progress: int = field(
        20,
        "Stop (state saved, --resume continues) after this many rounds in a row that keep no task: a teacher that cannot follow the format would otherwise spend tokens forever. 0 = never stop.",
    )
    price_per_1k_tokens: float | None = field(
        None, "Teacher price in dollars per 1,000 tokens (prompt + answer), for the report's cost."
    )


def check_flags(cfg: SelfInstructConfig) -> None:
    """Everything that can be checked before any file or network is touched."""
    if cfg.teacher_model and (cfg.api_base or cfg.model):
        raise UsageError("--teacher_model and --api_base/--model: give one teacher")
    if not cfg.teacher_model:
        if not cfg.api_base or not cfg.model:
            raise UsageError(
                "no teacher: give --api_base URL --model NAME (an OpenAI-compatible endpoint) or --teacher_model PATH"
            )
        if not cfg.api_base.startswith(("http://", "https://")):
            raise UsageError(f"--api_base {cfg.api_base!r}: must start with http:// or https://")
    for flag in (
        "num_instructions_to_generate",
        "num_prompt_instructions",
        "request_batch_size",
        "max_tokens",
        "max_concurrency",
    ):
        if getattr(cfg, flag) < 1:
            raise UsageError(f"--{flag} {getattr(cfg, flag)}: must be >= 1")
    if cfg.max_rounds_without_progress < 0:
        raise UsageError(
            f"--max_rounds_without_progress {cfg.max_rounds_without_progress}: must be >= 0"
        )
    if cfg.max_retries < 0:
        raise UsageError(f"--max_retries {cfg.max_retries}: must be >= 0")
    if not cfg.temperature >= 0:
        raise UsageError(f"--temperature {cfg.temperature}: must be >= 0")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top_p {cfg.top_p}: must be in (0, 1]")
    if not 0 < cfg.similarity_threshold <= 1:
        raise UsageError(f"--similarity_threshold {cfg.similarity_threshold}: must be in (0, 1]")
    if not cfg.request_timeout > 0:
        raise UsageError(f"--request_timeout {cfg.request_timeout}: must be > 0")
    if cfg.price_per_1k_tokens is not None and cfg.price_per_1k_tokens < 0:
        raise UsageError(f"--price_per_1k_tokens {cfg.price_per_1k_tokens}: must be >= 0")


def recipe_of(cfg: SelfInstructConfig) -> dict:
    return {name: getattr(cfg, name) for name in RECIPE_FIELDS}
