"""Merge a trained LoRA adapter into its base model and write a plain transformers folder.

The adapter folder (finetune.py's output) says which base and template it belongs to
(`lora_alpaca.json`); the base is always loaded unquantized for merging, because merging
into int8/nf4 weights would re-quantize the sum and lose most of the adapter. The export is
written into a private temp folder beside `--output_dir` and renamed at the end, so a crash
never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_alpaca.errors import Problems, UsageError
from lora_alpaca.export.adapter import (
    AdapterInfo,
    attach_adapter,
    load_base,
    load_tokenizer_for,
    read_adapter,
)
from lora_alpaca.export.bundle import read_eval_results
from lora_alpaca.export.output import (
    model_card,
    prepare_output,
    publish,
    write_hf_folder,
)
from lora_alpaca.fileio import discard
from lora_alpaca.models import load_config


def dequantize_into(plain, quantized) -> int:
    """Copy the dequantized nf4/int8 weights of `quantized` into the fp32 `plain` model.

    This is the base the adapter actually saw during QLoRA training; merging onto it
    reproduces the adapter's outputs, merging onto the original weights does not quite.
    Returns the number of weights replaced.
    """
    from peft.utils.integrations import dequantize_module_weight

    plain_modules = dict(plain.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                weight = dequantize_module_weight(module).to(torch.float32)
                plain_modules[name].weight.copy_(weight)
                replaced += 1
    return replaced


def merge_adapter(peft_model):
    """peft's merge, then a check that it really merged (alpaca-lora's exporter once
    silently returned the unmerged base on a newer peft)."""
    merged = peft_model.merge_and_unload()
    leftovers = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftovers:
        raise RuntimeError(f"peft merge left LoRA modules behind: {leftovers[:3]}")
    return merged


# --- the export run -------------------------------------------------------------------

EXPORT_RECORD = "export.json"


def resolve_merge_base(choice: str, info: AdapterInfo) -> str:
    if choice == "auto":
        return "dequantized" if info.quantization in ("4bit", "8bit") else "original"
    if choice == "dequantized" and info.quantization not in ("4bit", "8bit"):
        raise UsageError(
            f"--merge_base dequantized: the adapter was trained on an unquantized base "
            f"(quantization {info.quantization!r}); there is nothing to dequantize, use original"
        )
    return choice


def merged_model(info: AdapterInfo, merge_base: str, cfg, tokenizer=None, prompts=None):
    """(merged fp32 model, reference outputs of base+adapter before merging or None)."""
    from lora_alpaca.export.parity import reference_outputs

    base = load_base(info, "none", cfg.allow_pickle, cfg.trust_remote_code)
    if merge_base == "dequantized":
        quantized = load_base(info, info.quantization, cfg.allow_pickle, cfg.trust_remote_code)
        dequantize_into(base, quantized)
        del quantized
    peft_model = attach_adapter(base, info)
    refs = reference_outputs(peft_model, tokenizer, prompts) if prompts else None
    return merge_adapter(peft_model), refs


def compare_merge_bases(info: AdapterInfo, chosen: str, merged, tokenizer, prompts, cfg) -> dict:
    """Both merge bases against the adapter as trained (quantized base + LoRA)."""
    from lora_alpaca.export.parity import rank_candidates, reference_outputs

    flags = (cfg.allow_pickle, cfg.trust_remote_code)
    trained = attach_adapter(load_base(info, info.quantization, *flags), info)
    refs = reference_outputs(trained, tokenizer, prompts, n_greedy=0)
    del trained
    other = "original" if chosen == "dequantized" else "dequantized"
    candidates = {chosen: merged, other: merged_model(info, other, cfg)[0]}
    ranked = rank_candidates(refs, candidates, tokenizer.eos_token_id)
    return {"exported": chosen, "quantization": info.quantization, **ranked}


def _write_report(out: Path, report: dict) -> None:
    """parity.json, with the verdict of its checks (`passed`: every check passed)."""
    from lora_alpaca.export.parity import REPORT_NAME
    from lora_alpaca.fileio import write_json_atomic

    report["passed"] = all(s["passed"] for s in report["checks"])
    write_json_atomic(out / REPORT_NAME, report)


def bundle_plan(cfg, gguf_types: list[str]) -> tuple[list[str], str | None]:
    """(merged GGUF types, LoRA GGUF type or None) after --bundle's defaults."""
    from lora_alpaca.export.gguf import GGUF_TYPES

    lora_type = None if cfg.gguf_lora == "none" else cfg.gguf_lora
    if cfg.eval_results and not cfg.bundle:
        raise UsageError("--eval_results: goes with --bundle (the bundle's model card)")
    if not cfg.bundle:
        return gguf_types, lora_type
    if cfg.gguf_only:
        raise UsageError("--bundle holds the transformers checkpoint too; drop --gguf_only")
    # The files hobbyists download: f16 and, where the writer has it, q4_k_m.
    default = [q for q in ("f16", "q4_k_m") if q in GGUF_TYPES]
    return gguf_types or default, lora_type or "f16"


def write_modelfiles(out: Path, renderer, gguf_types: list[str], lora_type: str | None) -> None:
    """Modelfile (FROM the first merged GGUF) and Modelfile.adapter (FROM base + ADAPTER);
    with only the LoRA GGUF, the adapter form is the Modelfile."""
    from lora_alpaca.export.gguf import gguf_file_name
    from lora_alpaca.export.gguf_lora import adapter_file_name, base_file_name
    from lora_alpaca.export.modelfile import ADAPTER_NAME, NAME, modelfile

    if gguf_types:
        (out / NAME).write_text(modelfile(renderer, gguf_file_name(gguf_types[0])), "utf-8")
    if lora_type:
        text = modelfile(renderer, base_file_name(lora_type), adapter_file_name(lora_type))
        (out / (ADAPTER_NAME if gguf_types else NAME)).write_text(text, "utf-8")


def write_bundle_card(out: Path, info: AdapterInfo, record: dict, report: dict, results) -> None:
    from lora_alpaca.export.bundle import bundle_card, copy_records
    from lora_alpaca.export.parity import summary_lines

    copy_records(info, out)
    record = {**record, "files": sorted(p.name for p in out.iterdir())}
    card = bundle_card(info, record, {"summary": summary_lines(report)}, results)
    (out / "README.md").write_text(card, encoding="utf-8")


def _check_parity_prompts(n: int) -> None:
    if n < 1:
        raise UsageError(f"--parity_prompts {n}: must be at least 1")


def _check_shard_size(size) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise UsageError(f"--max_shard_size {size!r}: not a size; use e.g. 500MB or 2GB") from None


def run_export(cfg) -> int:
    """The whole `export_hf_checkpoint.py` run; returns the exit code (1: parity failed)."""
    from lora_alpaca.export.gguf import (
        check_supported,
        gguf_file_name,
        tokenizer_metadata,
        write_gguf,
    )
    from lora_alpaca.export.parity import check_exports, parity_prompts, summary_lines
    from lora_alpaca.export.quants import parse_gguf_types
    from lora_alpaca.fileio import write_json_atomic
    from lora_alpaca.progress import stage

    # The independent checks all run, so one try names every bad flag and file.
    problems = Problems()
    problems.check(_check_parity_prompts, cfg.parity_prompts)
    info = problems.check(
        read_adapter, cfg.lora_weights, cfg.base_model, cfg.allow_pickle, cfg.trust_remote_code
    )
    gguf_types = problems.check(parse_gguf_types, cfg.gguf)
    problems.check(_check_shard_size, cfg.max_shard_size)  # now, not after minutes of merging
    problems.raise_any()
    if cfg.parity_only:
        return run_parity_only(cfg, info)
    if cfg.gguf_only and not gguf_types:
        raise UsageError("--gguf_only: also pass --gguf (e.g. --gguf q4_k_m)")
    gguf_types, lora_type = bundle_plan(cfg, gguf_types)
    eval_results = read_eval_results(cfg.eval_results) if cfg.bundle else {}
    merge_base = resolve_merge_base(cfg.merge_base, info)
    tokenizer = load_tokenizer_for(info, cfg.trust_remote_code)
    from lora_alpaca.chat_template import renderer_from_manifest

    # The template of training goes into every artifact (tokenizer and GGUF).
    renderer = renderer_from_manifest(info.manifest, tokenizer)
    tokenizer.chat_template = renderer.jinja_source
    if gguf_types or lora_type:  # refuse unsupported models before heavy work or disk writes
        base_config = load_config(info.base, cfg.trust_remote_code)
        check_supported(base_config)
        tokenizer_metadata(tokenizer, base_config.vocab_size)
    from lora_alpaca.export.output import export_bytes

    # base-<type>.gguf weighs what a merged GGUF of that type does (the adapter: little)
    written = gguf_types + ([lora_type] if lora_type else [])
    need = export_bytes(info.base.path, cfg.dtype, written, not cfg.gguf_only)
    tmp = prepare_output(cfg.output_dir, need_bytes=need)
    try:
        prompts = parity_prompts(info.template, info.run, cfg.parity_prompts)
        with stage(
            f"merging {info.dir} into {info.base.name} (merge base: {merge_base})", "merged"
        ):
            merged, refs = merged_model(info, merge_base, cfg, tokenizer, prompts)
        record = {
            "adapter": str(info.dir.resolve()),
            "base_model": info.manifest["base_model"]["name"],
            "merge_base": merge_base,
            "dtype": cfg.dtype,
            "transformers": not cfg.gguf_only,
            "gguf": gguf_types,
            "gguf_lora": lora_type,
            "template": {"name": info.template.name, **info.template.to_dict()},
        }
        report: dict = {"prompts": prompts}
        if info.quantization in ("4bit", "8bit"):
            with stage(
                "comparing merge bases against the adapter on its quantized base", "compared"
            ):
                report["merge_base"] = compare_merge_bases(
                    info, merge_base, merged, tokenizer, prompts, cfg
                )
        name = f"{Path(info.manifest['base_model']['name']).name}-{info.dir.resolve().name}"
        for qtype in gguf_types:  # before the HF write, which rounds `merged` in place
            with stage(f"writing {gguf_file_name(qtype)}", "written"):
                write_gguf(
                    merged,
                    tokenizer,
                    info.template,
                    tmp / gguf_file_name(qtype),
                    qtype,
                    name,
                    stop_strings=info.stop_strings,
                    renderer=renderer,
                )
        if not cfg.gguf_only:
            with stage(f"writing the transformers checkpoint ({cfg.dtype})", "written"):
                write_hf_folder(merged, tokenizer, info, tmp, cfg.dtype, cfg.max_shard_size)
        del merged
        if lora_type:
            from lora_alpaca.export.gguf_lora import write_lora_files

            with stage(f"writing base-{lora_type}.gguf and adapter-{lora_type}.gguf", "written"):
                write_lora_files(info, cfg, lora_type, tmp, tokenizer, renderer, name)
        write_modelfiles(tmp, renderer, gguf_types, lora_type)
        write_json_atomic(tmp / EXPORT_RECORD, record)
        (tmp / "README.md").write_text(model_card(info, record), encoding="utf-8")
        with stage(f"parity check of every artifact on {len(prompts)} held-out prompts", "checked"):
            report["checks"] = check_exports(tmp, refs, info, record, renderer)
        _write_report(tmp, report)
        if cfg.bundle:
            write_bundle_card(tmp, info, record, report, eval_results)
    except BaseException:
        discard(tmp)
        raise
    out = publish(tmp, cfg.output_dir)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {out}" + ("" if report["passed"] else f"; parity FAILED, see {out}/parity.json"))
    return 0 if report["passed"] else 1


def run_parity_only(cfg, info: AdapterInfo) -> int:
    """Re-check an existing export folder against its adapter (`--parity_only`)."""
    from lora_alpaca.export.parity import check_exports, parity_prompts, summary_lines

    out = Path(cfg.output_dir or "")
    if not cfg.output_dir or not (out / EXPORT_RECORD).is_file():
        raise UsageError(
            f"--parity_only: --output_dir {cfg.output_dir!r} is not an export folder (no {EXPORT_RECORD})"
        )
    record = json.loads((out / EXPORT_RECORD).read_text(encoding="utf-8"))
    from lora_alpaca.chat_template import renderer_from_manifest

    tokenizer = load_tokenizer_for(info, cfg.trust_remote_code)
    renderer = renderer_from_manifest(info.manifest, tokenizer)
    prompts = parity_prompts(info.template, info.run, cfg.parity_prompts)
    _, refs = merged_model(info, record["merge_base"], cfg, tokenizer, prompts)
    from lora_alpaca.progress import stage

    with stage(f"parity check of {out} on {len(prompts)} held-out prompts", "checked"):
        report = {"prompts": prompts, "checks": check_exports(out, refs, info, record, renderer)}
    _write_report(out, report)
    for line in summary_lines(report):
        print(line)
    return 0 if report["passed"] else 1
