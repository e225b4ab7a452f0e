"""`evaluate.py answers`: answer an evaluation set with one system and write AlpacaEval's
`model_outputs.json` (`[{instruction, output, generator, dataset}]`, plus `finish_reason`
and `new_tokens` for the probe; AlpacaEval ignores extra keys).

A system is a local base / adapter / merged model / GGUF (the project's engine, batched by
prompt length like `generate.py --input_file`) or any OpenAI-compatible endpoint."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca import cli
from lora_alpaca.errors import UsageError
from lora_alpaca.evaluate.heldout import attach_references, reference_losses
from lora_alpaca.evaluate.sets import alpaca_eval_instruction, read_eval_set
from lora_alpaca.fileio import check_output_file
from lora_alpaca.log import log

F = cli.field


@dataclass
class AnswersConfig:
    eval_set: str = F(
        "",
        "Prompts: self-instruct JSONL (the 252 user-oriented prompts), AlpacaEval JSON, Alpaca rows or plain JSONL of instructions.",
    )
    output_file: str = F("", "Where the answers go, AlpacaEval format (e.g. model_outputs.json).")
    generator: str = F(
        "", "System name written in every row (default: adapter/base/endpoint model name)."
    )
    base_model: str | None = F(
        None, "Local base model folder, .gguf or name; default: the adapter's base, else SmolLM2."
    )
    lora_weights: str | None = F(None, "Local adapter folder written by finetune.py.")
    reference_outputs: str | None = F(
        None,
        "Reference answers (AlpacaEval JSON, paired by instruction) scored as held-out loss "
        "under a local model; default: the set's own answers where it has them.",
    )
    prompt_template_name: str | None = F(
        None, "Template for local models; default: the adapter's own, else alpaca."
    )
    api_base: str | None = F(
        None, "OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) instead of a local model."
    )
    api_model: str = F("", "Model name sent to --api_base.")
    api_key_env: str = F(
        "OPENAI_API_KEY", "Environment variable holding the endpoint's key (unset: 'none')."
    )
    max_new_tokens: int = F(256, "Most tokens per answer.")
    batch_size: int = F(8, "Prompts per batch for local models.")
    concurrency: int = F(
        1, "Requests in flight at once to --api_base (a batching server decodes them together)."
    )
    limit: int = F(0, "Answer only the first N prompts (0 = all).")
    overwrite: bool = F(False, "Replace --output_file if it exists.")


def check(cfg: AnswersConfig) -> Path:
    if not cfg.eval_set:
        raise UsageError("--eval_set is required (a JSON/JSONL file of prompts)")
    if not cfg.output_file:
        raise UsageError("--output_file is required (e.g. model_outputs.json)")
    # The shared output-file rule: never the --eval_set itself (even with --overwrite), no
    # symlink or device replaced, an existing file only with --overwrite, a writable folder.
    out = check_output_file(
        "--output_file",
        cfg.output_file,
        inputs={"--eval_set": cfg.eval_set, "--reference_outputs": cfg.reference_outputs},
        overwrite=cfg.overwrite,
        overwrite_flag="--overwrite",
    )
    if cfg.api_base and (cfg.lora_weights or cfg.base_model):
        raise UsageError("--api_base and a local model (--base_model/--lora_weights): give one")
    if cfg.api_base and cfg.reference_outputs:
        raise UsageError(
            "--reference_outputs: held-out loss needs a local model's probabilities; "
            "not available with --api_base"
        )
    if cfg.api_base and not cfg.api_model:
        raise UsageError("--api_base needs --api_model (the model name the endpoint serves)")
    for flag in ("max_new_tokens", "batch_size", "concurrency"):
        if getattr(cfg, flag) < 1:
            raise UsageError(f"--{flag} {getattr(cfg, flag)}: must be >= 1")
    if cfg.limit < 0:
        raise UsageError(f"--limit {cfg.limit}: must be >= 0")
    return out


def _local_answers(cfg: AnswersConfig, rows: list[dict]) -> tuple[list[dict], str]:
    from lora_alpaca.generate.batch import generate_rows
    from lora_alpaca.generate.engine import DecodingSettings
    from lora_alpaca.generate.loading import LoadRequest, load_generator

    loaded = load_generator(
        LoadRequest(
            base_model=cfg.base_model,
            lora_weights=cfg.lora_weights,
            prompt_template_name=cfg.prompt_template_name,
        )
    )
    log(loaded.description, tag="evaluate")
    settings = DecodingSettings(max_new_tokens=cfg.max_new_tokens).validate()
    answered = generate_rows(loaded.generator, rows, settings, cfg.batch_size)
    if attach_references(rows, cfg.reference_outputs):
        for a, scored in zip(answered, reference_losses(loaded.generator, rows), strict=True):
            if scored:
                a["reference_loss"], a["reference_tokens"] = round(scored[0], 6), scored[1]
    name = cfg.generator or (
        Path(cfg.lora_weights).name
        if cfg.lora_weights
        else f"base-{Path(cfg.base_model or 'smollm2').name}"
    )
    return answered, name


def _api_answers(cfg: AnswersConfig, rows: list[dict]) -> tuple[list[dict], str]:
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from tqdm import tqdm

    from lora_alpaca.progress import bar_enabled

    client = openai.OpenAI(
        base_url=cfg.api_base, api_key=os.environ.get(cfg.api_key_env) or "none", max_retries=2
    )

    def answer(i: int) -> dict:
        r = rows[i]
        try:
            resp = client.chat.completions.create(
                model=cfg.api_model,
                messages=[
                    {
                        "role": "user",
                        "content": alpaca_eval_instruction(r["instruction"], r["input"]),
                    }
                ],
                max_tokens=cfg.max_new_tokens,
                temperature=0,
            )
        except openai.APIConnectionError:
            raise UsageError(f"--api_base {cfg.api_base}: cannot connect") from None
        except openai.APIStatusError as e:
            raise UsageError(
                f"--api_base {cfg.api_base}: prompt {i}: HTTP {e.status_code}"
            ) from None
        choice = resp.choices[0]
        reason = {"stop": "eos", "length": "length"}.get(choice.finish_reason, choice.finish_reason)
        tokens = resp.usage.completion_tokens if resp.usage else 0
        return {
            **r,
            "response": choice.message.content or "",
            "finish_reason": reason,
            "new_tokens": tokens,
        }

    # Threads, not asyncio: the client is blocking and the work is waiting on the server.
    # map() keeps the set's order and re-raises the first UsageError.
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        done = pool.map(answer, range(len(rows)))
        bar = tqdm(
            done, total=len(rows), desc="answers", file=sys.stderr, disable=not bar_enabled()
        )
        answered = list(bar)
    return answered, cfg.generator or cfg.api_model


def main(cfg: AnswersConfig) -> int:
    from lora_alpaca.fileio import write_json_atomic

    out = check(cfg)
    rows = read_eval_set(cfg.eval_set, "--eval_set", cfg.limit)
    answered, name = (_api_answers if cfg.api_base else _local_answers)(cfg, rows)
    records = [
        {
            "instruction": alpaca_eval_instruction(a["instruction"], a["input"]),
            "output": a["response"],
            "generator": name,
            "dataset": a["dataset"],
            "finish_reason": a["finish_reason"],
            "new_tokens": a["new_tokens"],
            **{k: a[k] for k in ("reference_loss", "reference_tokens") if k in a},
        }
        for a in answered
    ]
    write_json_atomic(out, records)
    log(f"wrote {len(records)} answers by {name!r} to {out}", tag="evaluate")
    return 0
