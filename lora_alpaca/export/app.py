"""The export command: its flags (this dataclass's field help is the --help text) and entry."""

from __future__ import annotations

from dataclasses import dataclass

from lora_alpaca import cli

HELP = (
    "Merge a lora-alpaca adapter into its base model; write a transformers folder and/or a\n"
    "GGUF file; check that the export says what the adapter said."
)


@dataclass
class ExportConfig:
    lora_weights: str = cli.field("", help="Adapter folder written by finetune.py (required).")
    output_dir: str = cli.field(
        "", help="New folder for the merged model (required; must not exist or be empty)."
    )
    base_model: str | None = cli.field(
        None, help="Override the base model recorded in the adapter (folder, .gguf or hub id)."
    )
    dtype: str = cli.field(
        "bf16", help="Weight dtype of the transformers export.", choices=["bf16", "fp16", "fp32"]
    )
    max_shard_size: str = cli.field("2GB", help="Largest safetensors shard, e.g. 500MB, 2GB.")
    gguf: str = cli.field(
        "none",
        help="Also write GGUF files for llama.cpp / Ollama / LM Studio (LLaMA family): one or "
        "several of f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, comma-separated (e.g. "
        "q4_k_m,q5_k_m); each goes to model-<type>.gguf and through the parity check.",
    )
    gguf_only: bool = cli.field(False, help="Write only the GGUF files (needs --gguf).")
    gguf_lora: str = cli.field(
        "none",
        help="Also write the adapter alone as a llama.cpp LoRA GGUF (adapter-<type>.gguf, for "
        "llama.cpp --lora / Ollama ADAPTER) and the unmerged base beside it (base-<type>.gguf).",
        choices=["none", "f16", "q8_0"],
    )
    bundle: bool = cli.field(
        False,
        help="Write everything into --output_dir: the merged checkpoint, merged GGUF files "
        "(--gguf, default f16 and q4_k_m where available), the LoRA GGUF with its base "
        "(--gguf_lora, default f16), Modelfiles and a model card with the training record.",
    )
    eval_results: str | None = cli.field(
        None,
        help="With --bundle: an evaluate.py judge/human output folder whose win rates go into "
        "the model card.",
    )
    merge_base: str = cli.field(
        "auto",
        help="For adapters trained on a 4-/8-bit base: merge onto the original weights or onto "
        "the dequantized ones the adapter was trained against (auto: dequantized for those, "
        "original otherwise). Both are compared with the adapter and reported.",
        choices=["auto", "original", "dequantized"],
    )
    parity_only: bool = cli.field(
        False, help="Only re-run the parity check on an existing export in --output_dir."
    )
    parity_prompts: int = cli.field(
        8, help="Number of prompts for the parity check (from the training data when available)."
    )
    trust_remote_code: bool = cli.field(
        False, help="Allow model code from the base model's folder/repo to run."
    )
    allow_pickle: bool = cli.field(
        False, help="Allow loading pickled .bin weights (can run code; safetensors otherwise)."
    )


def main(cfg: ExportConfig) -> int:
    import torch

    from lora_alpaca.export.merge import run_export

    torch.manual_seed(0)
    return run_export(cfg)


command = cli.build_command(ExportConfig, main, help=HELP)


def console_main() -> None:
    """The `lora-alpaca-export` console command."""
    cli.run(command)
