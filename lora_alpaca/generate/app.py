"""generate.py's flags (`GenerateConfig`, the single source of defaults and `--help`) and
its three ways to run: one prompt, a file of prompts in batches, or the browser sampler."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca import cli
from lora_alpaca.errors import UsageError
from lora_alpaca.generate.engine import MODES, DecodingSettings
from lora_alpaca.log import log
from lora_alpaca.serve.flags import ServeFlags, check_api_flags

F = cli.field


@dataclass
class GenerateConfig(ServeFlags):
    base_model: str | None = F(
        None,
        "Base model folder, .gguf or hub id; default: the adapter's base (its manifest), else the embedded SmolLM2-135M-Instruct. A merged model folder works too.",
    )
    lora_weights: list[str] | None = F(
        None,
        "Adapter folder written by finetune.py (its manifest gives base model and template); "
        "with --api repeat it to serve several adapters (otherwise the last one given is used).",
        multiple=True,
    )
    prompt_template_name: str | None = F(
        None, "Template name or .json path; default: the adapter's own template, else alpaca."
    )
    quantization: str = F(
        "none", "Load the base 8-/4-bit with bitsandbytes.", choices=["none", "8bit", "4bit"]
    )
    load_8bit: bool = F(False, "Same as --quantization 8bit (kept for alpaca-lora users).")
    dtype: str = F(
        "auto",
        "Base weights dtype (auto: bf16 where supported, else fp16 on GPU / fp32 on CPU).",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    prompt: str | None = F(None, "Generate for this one instruction and print the answer (no UI).")
    input: str | None = F(None, "Input / context for --prompt.")
    input_file: str | None = F(
        None,
        "JSON/JSONL rows (Alpaca, plain instruction or self-instruct rows) to answer in batches.",
    )
    output_file: str | None = F(
        None, "Where --input_file answers go (JSONL: response + finish_reason per row)."
    )
    probe_report: str | None = F(
        None, "With --input_file: also write the probe report (Markdown) to this file."
    )
    overwrite_output_file: bool = F(
        False,
        "Replace an existing --output_file / --probe_report (off: an existing file is refused).",
    )
    mode: str = F(
        "greedy",
        "Decoding: greedy, sample (temperature/top_p/top_k/seed) or beam (num_beams).",
        choices=list(MODES),
    )
    temperature: float = F(0.7, "Sampling temperature (--mode sample).")
    top_p: float = F(0.9, "Nucleus sampling mass (--mode sample).")
    top_k: int = F(40, "Sample among the k likeliest tokens, 0 = off (--mode sample).")
    num_beams: int = F(4, "Beams (--mode beam).")
    repetition_penalty: float = F(1.0, "Penalty for repeating tokens (1.0 = off).")
    max_new_tokens: int = F(256, "Most tokens to generate per answer.")
    min_new_tokens: int = F(
        0,
        "Fewest tokens per answer: the end-of-answer token is held back until then (the template's stop strings still end it). 0 = off.",
    )
    seed: int = F(0, "Random seed: the same seed gives the same sample.")
    batch_size: int = F(8, "Prompts per batch with --input_file.")
    server_name: str = F(
        "127.0.0.1", "Address the sampler / --api listens on (0.0.0.0 = every network interface)."
    )
    server_port: int = F(7860, "Port of the sampler / --api.")
    share: bool = F(False, "Also publish the sampler on a public gradio.live link (opt-in).")
    concurrency_limit: int = F(
        2, "Requests generating at once in the sampler; the rest wait in a queue."
    )
    max_input_chars: int = F(4000, "Sampler: longest instruction + input accepted, in characters.")
    max_new_tokens_limit: int = F(
        1024, "Sampler and --api: hard cap on max_new_tokens / max_tokens, whatever a request asks."
    )
    trust_remote_code: bool = F(
        False, "Allow model folders to run their own Python code (off: safer)."
    )
    allow_pickle_adapter: bool = F(
        False,
        "Allow adapter_model.bin (a pickle) when no safetensors adapter exists. Also spelled "
        "--allow_pickle, export's name.",
        aliases=("--allow_pickle",),
    )
    # Safeguards (lora_alpaca/safeguards): both off by default.
    watermark: bool = F(False, "Watermark every answer (green-list scheme, transformers).")
    watermark_key: int | None = F(
        None, "Watermark key; default: the key file's, else a new secret one saved there."
    )
    watermark_key_file: str | None = F(
        None,
        "Key file (JSON, 0600); default: watermark_key.json beside --output_file, else in "
        "--lora_weights, else here (detection also looks beside the texts).",
    )
    watermark_greenlist_ratio: float = F(0.25, "Share of the vocabulary that is green.")
    watermark_bias: float = F(2.0, "Logit bias added to green tokens (stronger = more visible).")
    watermark_seeding_scheme: str = F(
        "lefthash", "Green list seeded by the previous token(s) or the token itself.",
        choices=["lefthash", "selfhash"],
    )  # fmt: skip
    watermark_context_width: int = F(1, "Previous tokens that seed the green list.")
    detect_watermark: str | None = F(
        None, "JSONL of texts ('response' or 'text') to score for the watermark -> --output_file."
    )
    watermark_z_threshold: float = F(4.0, "Detector: z-score above which a text is watermarked.")
    watermark_min_tokens: int = F(16, "Detector: fewer scored tokens than this = too short.")
    moderation: str = F(
        "none", "Content filter on prompts and outputs: none, keywords, openai or "
        "python:MODULE:FUNCTION.",
    )  # fmt: skip
    moderation_keywords: str | None = F(
        None, "Word/phrase list for --moderation keywords; default: the starter list shipped."
    )
    moderation_api_base: str | None = F(
        None, "--moderation openai: base URL, /moderations is appended (key: $MODERATION_API_KEY "
        "or $OPENAI_API_KEY).",
    )  # fmt: skip
    moderation_model: str | None = F(None, "--moderation openai: model name to ask for.")
    moderation_threshold: float = F(0.5, "--moderation openai: flag when a category score >= this.")
    moderation_timeout: float = F(10.0, "--moderation openai: seconds before it counts as down.")
    moderation_window: int = F(64, "Streaming: check the output every this many new characters.")
    moderation_refusal: str = F(
        "Sorry, I can't help with that.", "What a flagged prompt or answer gets instead."
    )
    moderation_fail_open: bool = F(
        False, "When the filter is unreachable, let text through (default: refuse)."
    )

    @property
    def loaded_adapter(self) -> str | None:
        """The --lora_weights folder load_generator loads: with --api the first (the others
        are added beside it, serve.models), otherwise the last one given."""
        if not self.lora_weights:
            return None
        return self.lora_weights[0] if self.api else self.lora_weights[-1]


def check_flags(cfg: GenerateConfig) -> DecodingSettings:
    """Everything that can be checked before the (slow) model load."""
    if cfg.load_8bit:
        if cfg.quantization == "4bit":
            raise UsageError("--load_8bit conflicts with --quantization 4bit; give one of them")
        cfg.quantization = "8bit"
    if cfg.prompt is not None and cfg.input_file:
        raise UsageError("--prompt and --input_file: give one of them")
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise UsageError("--prompt: empty instruction")
    if cfg.input is not None and cfg.prompt is None:
        raise UsageError("--input needs --prompt (rows of --input_file carry their own input)")
    if bool(cfg.input_file) != bool(cfg.output_file) and not cfg.detect_watermark:
        raise UsageError("--input_file and --output_file go together")
    if cfg.probe_report and not cfg.input_file:
        raise UsageError("--probe_report needs --input_file and --output_file")
    for flag in ("batch_size", "concurrency_limit", "max_input_chars", "max_new_tokens_limit"):
        if getattr(cfg, flag) < 1:
            raise UsageError(f"--{flag} {getattr(cfg, flag)}: must be >= 1")
    if not 0 <= cfg.server_port <= 65535:
        raise UsageError(f"--server_port {cfg.server_port}: must be 0-65535")
    return DecodingSettings.from_config(cfg).validate()


def request_of(cfg: GenerateConfig):
    from lora_alpaca.generate.loading import LoadRequest

    return LoadRequest(
        base_model=cfg.base_model,
        lora_weights=cfg.loaded_adapter,
        prompt_template_name=cfg.prompt_template_name,
        quantization=cfg.quantization,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle_adapter=cfg.allow_pickle_adapter,
    )


def load_generator(req):
    from lora_alpaca.generate.loading import load_generator as load

    return load(req)


def chat_renderer_for(loaded):
    """The adapter's training renderer (chat page first when it trained on conversations),
    else the base tokenizer's chat template, else the alpaca form of the prompt template.
    The manifest is the one load_generator read for the adapter it loaded (the last given)."""
    from lora_alpaca.chat_template import build_renderer, default_spec, renderer_from_manifest

    gen, manifest = loaded.generator, loaded.adapter_manifest
    if manifest is not None:
        renderer = renderer_from_manifest(manifest, gen.tokenizer)
        return renderer, manifest.get("data_format", "alpaca") != "alpaca"
    return build_renderer(gen.tokenizer, default_spec(gen.tokenizer), gen.template), False


def main(cfg: GenerateConfig) -> int:
    from lora_alpaca.fileio import check_output_file
    from lora_alpaca.generate.batch import answers_bytes, read_prompt_rows

    settings = check_flags(cfg)
    if cfg.detect_watermark:
        from lora_alpaca.safeguards.setup import run_detect

        return run_detect(cfg, lambda: load_generator(request_of(cfg)).generator)
    from lora_alpaca.safeguards.setup import build_safeguards

    safeguards = build_safeguards(cfg)
    if cfg.api:
        from lora_alpaca.serve.app import serve

        return serve(cfg, check_api_flags(cfg), safeguards)
    rows = read_prompt_rows(cfg.input_file) if cfg.input_file else None
    inputs = {"--input_file": cfg.input_file}
    out = None
    if cfg.output_file:
        out = check_output_file(
            "--output_file",
            cfg.output_file,
            inputs,
            overwrite=cfg.overwrite_output_file,
            need_bytes=answers_bytes(rows, settings.max_new_tokens) if rows else 0,
        )
    if cfg.probe_report:
        check_output_file(
            "--probe_report",
            cfg.probe_report,
            inputs,
            others={"--output_file": cfg.output_file},
            overwrite=cfg.overwrite_output_file,
        )

    loaded = load_generator(request_of(cfg))
    gen = loaded.generator
    gen.safeguards = safeguards
    log(loaded.description, tag="generate")
    ctx = gen.context_len()
    if ctx and settings.max_new_tokens > ctx:
        log(
            f"warning: --max_new_tokens {settings.max_new_tokens} is beyond the model's "
            f"context of {ctx} tokens; each answer is capped to fit it",
            tag="generate",
        )

    if rows is not None:
        from lora_alpaca.fileio import write_jsonl_atomic, write_text_atomic
        from lora_alpaca.generate.batch import generate_rows

        renderer = chat_renderer_for(loaded)[0] if any("messages" in r for r in rows) else None
        answered = generate_rows(gen, rows, settings, cfg.batch_size, renderer=renderer)
        write_jsonl_atomic(out, answered)
        log(f"wrote {len(answered)} rows to {out}", tag="generate")
        if cfg.probe_report:
            from lora_alpaca.generate.probe import probe, report_markdown

            setup = (
                f"{loaded.description}; {cfg.input_file}; {settings.mode}, "
                f"max_new_tokens {settings.max_new_tokens}, batch {cfg.batch_size}"
            )
            md = report_markdown(probe(answered, gen.stop_strings), "Probe report", setup)
            write_text_atomic(Path(cfg.probe_report), md)
            print(md)
        return 0

    if cfg.prompt is not None:
        prompt = gen.prompt_for(cfg.prompt, cfg.input)
        shown, result = "", None
        for text, final in gen.stream(prompt, settings):
            result = final or result
            if sys.stdout.isatty() and text.startswith(shown):  # live tokens in a terminal
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(
            result.text[len(shown) :] + "\n"
            if result.text.startswith(shown)
            else "\n" + result.text + "\n"
        )
        print(
            f"[generate] ended by {result.finish_reason} after {result.new_tokens} tokens",
            file=sys.stderr,
        )
        return 0

    from lora_alpaca.generate.chat_page import build_app
    from lora_alpaca.generate.ui import ServerLimits, launch

    limits = ServerLimits(cfg.max_input_chars, cfg.max_new_tokens_limit, cfg.concurrency_limit)
    renderer, chat_first = chat_renderer_for(loaded)
    launch(
        build_app(gen, renderer, loaded.description, settings, limits, chat_first),
        cfg.server_name,
        cfg.server_port,
        cfg.share,
    )
    return 0


HELP = """Sample from a fine-tuned adapter (or a base / merged model): browser UI, one prompt, or a file.

\b
python generate.py --lora_weights ./lora-alpaca                       # sampler on 127.0.0.1:7860
python generate.py --lora_weights ./lora-alpaca --prompt "Tell me about alpacas."
python generate.py --lora_weights ./lora-alpaca --api                 # OpenAI API on 127.0.0.1:7860/v1
python generate.py --input_file prompts.jsonl --output_file out.jsonl  # batches, default base
python generate.py --lora_weights ./lora-alpaca --watermark --moderation keywords  # safeguards
python generate.py --detect_watermark out.jsonl --output_file scores.jsonl  # find the watermark
"""


def console_main() -> None:
    """The `lora-alpaca-generate` console command (same flags as generate.py)."""
    cli.run(cli.build_command(GenerateConfig, main, help=HELP))
