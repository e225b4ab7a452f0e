"""finetune.py's body: setup -> train -> cleanup, with the exit codes users see.

Exit codes: 0 done; 2 bad input (one line, nothing written); 3 the sentinel stopped the
run (NaN/Inf loss, loss stuck at 0, learning rate 0); 130/143 interrupted by SIGINT/SIGTERM
after saving a resumable checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import expand_user
from lora_alpaca.log import log
from lora_alpaca.progress import human_summary
from lora_alpaca.runlock import RunLock, lock_holder, overwrite_problem, remove_run_folder_contents
from lora_alpaca.train import checkpoint as ckpt
from lora_alpaca.train import distributed
from lora_alpaca.train.config import LORA_KEYS, FinetuneConfig, validate


def resolve_resume(cfg: FinetuneConfig, output_dir: Path) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "auto":
        from lora_alpaca.runfolder import MANIFEST_NAME

        if (output_dir / MANIFEST_NAME).is_file():
            raise UsageError(
                f"--resume_from_checkpoint auto: {output_dir} holds a finished run (its {MANIFEST_NAME} "
                "is written); nothing to resume. To train it further start a new run with "
                f"--init_from_adapter {output_dir} --output_dir NEW_FOLDER"
            )
        latest = ckpt.find_latest(output_dir)
        if latest is None:
            log(
                f"--resume_from_checkpoint auto: no complete checkpoint in {output_dir}; starting from the beginning"
            )
        return latest
    path = expand_user(cfg.resume_from_checkpoint).resolve()
    if not (path / ckpt.COMPLETE).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: not a complete checkpoint folder "
            f"(complete ones: {', '.join(p.name for p in ckpt.complete_checkpoints(output_dir)) or 'none'}; or use auto)"
        )
    return path


def check_cutoff(cfg: FinetuneConfig, tokenizer, template) -> None:
    shortest = len(tokenizer(template.build_prompt("x"), add_special_tokens=True)["input_ids"])
    if cfg.cutoff_len < shortest + 2:
        raise UsageError(
            f"--cutoff_len {cfg.cutoff_len} is shorter than the prompt template alone "
            f"({shortest} tokens for {template.name!r}); use at least {shortest + 16}"
        )


def metrics_sink(cfg: FinetuneConfig, output_dir: Path):
    """tensorboard / wandb writer, or None. Import errors are the user's to fix: say how."""
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                "--report_to tensorboard: pip install 'lora-alpaca[tensorboard]'"
            ) from None
        writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        return lambda step, d: [writer.add_scalar(k, v, step) for k, v in d.items()]
    if cfg.report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise UsageError("--report_to wandb: pip install 'lora-alpaca[wandb]'") from None
        if cfg.wandb_watch:
            os.environ["WANDB_WATCH"] = cfg.wandb_watch
        if cfg.wandb_log_model:
            os.environ["WANDB_LOG_MODEL"] = cfg.wandb_log_model
        run = wandb.init(
            project=cfg.wandb_project or None, name=cfg.wandb_run_name or None, config=cfg.to_dict()
        )
        return lambda step, d: run.log(d, step=step)
    return None


def val_sample(cfg: FinetuneConfig, prepared, k: int = 16) -> list[dict]:
    """A few held-out {instruction, input} rows for export's parity check (rows the adapter
    never trained on). Best effort: an unreadable source just gives no sample."""
    if prepared.val is None or "row" not in prepared.val.column_names:
        return []
    if prepared.audit.conversation:  # no instruction/input rows: not worth re-reading the data
        return []
    try:
        from lora_alpaca.data.sources import read_sources

        sources, _ = read_sources(cfg.data)
        records = [r for src in sources for r in src.records]
        out = []
        for idx in prepared.val["row"][:k]:
            rec = records[idx]
            out.append(
                {
                    "instruction": str(rec[cfg.instruction_column]),
                    "input": str(rec.get(cfg.input_column) or ""),
                }
            )
        return out
    except Exception:  # noqa: BLE001 - a convenience, never a reason to fail a finished run
        return []


def run_training(cfg: FinetuneConfig) -> int:
    started = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)  # cheap flag checks before the heavy imports below
    from lora_alpaca.data.audit import format_audit
    from lora_alpaca.data.pipeline import DataOptions, prepare_data
    from lora_alpaca.fileio import check_writable_dir, finetune_space_needed, lora_adapter_bytes
    from lora_alpaca.models import load_config, load_tokenizer, resolve_base_model
    from lora_alpaca.prompts import load_template
    from lora_alpaca.train.outputs import output_dir_problem

    # ---- setup: everything that can be wrong with the input fails here, before any write
    output_dir = expand_user(cfg.output_dir).resolve()
    if not cfg.audit_only:
        preflight_output_dir(cfg, output_dir)
    resume_path = resolve_resume(cfg, output_dir)
    if not cfg.resume_from_checkpoint and not cfg.audit_only and not cfg.overwrite_output_dir:
        problem = output_dir_problem(output_dir)
        if problem:
            raise UsageError(problem)
    template = load_template(cfg.prompt_template_name)
    ref = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(ref, cfg.trust_remote_code)
    base_config = load_config(ref, cfg.trust_remote_code)  # a bad model_type fails here
    check_cutoff(cfg, tokenizer, template)
    if not cfg.audit_only:
        need = finetune_space_needed(
            lora_adapter_bytes(base_config, cfg.lora_r, cfg.lora_target_modules)
        )
        check_writable_dir("--output_dir", output_dir, need)
    if cfg.init_from_adapter:
        from lora_alpaca.train.lora_setup import check_init_adapter

        check_init_adapter(cfg)  # rank and shapes against the config, before any write
    opts = DataOptions.from_config(cfg)
    # The tokenized cache is written only once every check below has passed.
    prepared = prepare_data(
        opts, tokenizer, template, for_training=not cfg.audit_only, defer_cache=not cfg.audit_only
    )
    prepared.audit.context_len = int(getattr(base_config, "max_position_embeddings", 0) or 0)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            format_audit(prepared.audit),
            file=sys.stderr if not cfg.audit_only else sys.stdout,
            flush=True,
        )
    if cfg.audit_only:
        return 0
    from lora_alpaca.chat_template import build_renderer

    # The template of training is the template of every artifact: conversation rows keep
    # their chat template (the renderer prepare_data encoded them with), Alpaca rows get
    # the multi-turn alpaca form of their prompt.
    renderer = (
        prepared.renderer
        if prepared.audit.conversation
        else build_renderer(tokenizer, "alpaca", template)
    )
    if len(prepared.train) < cfg.batch_size:
        raise UsageError(
            f"--batch_size {cfg.batch_size} is larger than the {len(prepared.train)} training rows; lower it"
        )
    if not cfg.add_eos_token:
        log("warning: --add_eos_token false: the model will not learn to stop generating")
    lock = RunLock(output_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _train_locked(
            cfg,
            started,
            output_dir,
            resume_path,
            template,
            ref,
            tokenizer,
            prepared,
            renderer,
            lock,
        )
    except BaseException:
        if lock is not None:
            lock.release(remove_dir_if_empty=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def preflight_output_dir(cfg: FinetuneConfig, output_dir: Path) -> None:
    """Checks on --output_dir that need no model: another live run, what
    --overwrite_output_dir would delete, and whether the folder can be written at all."""
    from lora_alpaca.fileio import check_writable_dir

    holder = lock_holder(output_dir)
    if holder:
        raise UsageError(
            f"--output_dir {output_dir}: another run is using it ({holder}); wait for it to finish or choose another folder"
        )
    if cfg.overwrite_output_dir:
        problem = overwrite_problem(
            output_dir,
            {
                "--data": cfg.data,
                "--base_model": cfg.base_model,
                "--init_from_adapter": cfg.init_from_adapter,
                "--prompt_template_name": cfg.prompt_template_name,
            },
        )
        if problem:
            raise UsageError(problem)
    check_writable_dir("--output_dir", output_dir)


def _setup_accelerator(cfg: FinetuneConfig):
    """Accelerator (processes, device), quantization and precision."""
    from lora_alpaca.models import resolve_precision
    from lora_alpaca.train.cpu_threads import set_threads

    accelerator = distributed.make_accelerator(cfg.fsdp)  # DDP, or FSDP2 (config / --fsdp)
    device = accelerator.device
    set_threads(cfg.threads, device, accelerator.num_processes, log)  # --threads, or a note
    auto = "8bit" if device.type == "cuda" else "none"  # as alpaca-lora; bf16 beats it on CPU
    quantization = cfg.quantization if cfg.quantization != "auto" else auto
    quantization = distributed.check_quantization(accelerator, cfg.quantization, quantization)
    precision = resolve_precision(cfg.dtype, device, quantization)
    return accelerator, quantization, precision


def _setup_model(cfg: FinetuneConfig, ref, precision, quantization, accelerator):
    """The base model and its LoRA layers."""
    from lora_alpaca.models import load_model
    from lora_alpaca.train.lora_setup import add_lora

    model = load_model(ref, precision, quantization, accelerator.device, cfg.trust_remote_code)
    distributed.set_wrap_classes(accelerator, model)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout are repeatable
    return model, add_lora(model, cfg, quantized=quantization != "none")


def _setup_resume(cfg: FinetuneConfig, resume_path: Path | None, data_fp: str, accelerator):
    """The checkpoint to resume from, refused if data or settings changed (before the model
    loads: a refusal costs nothing)."""
    from lora_alpaca.train.loop import check_resume, resume_fingerprint

    if not resume_path:
        return None
    resume = ckpt.load_checkpoint(resume_path, accelerator.process_index)  # this rank's RNG
    saved = resume["trainer_state"]
    distributed.check_world_size(saved, accelerator.num_processes, cfg.force_resume)
    check_resume(saved["resume_fingerprint"], resume_fingerprint(cfg, data_fp), cfg.force_resume)
    log(f"resuming from {resume_path} (step {saved['global_step']})")
    return resume


def _setup_data(prepared) -> tuple[list[dict], list[dict]]:
    def rows(ds) -> list[dict]:
        if ds is None:
            return []
        return [{"input_ids": i, "labels": lab} for i, lab in zip(ds["input_ids"], ds["labels"])]

    return rows(prepared.train), rows(prepared.val)


def _train_locked(
    cfg, started, output_dir, resume_path, template, ref, tokenizer, prepared, renderer, lock
) -> int:
    """Model, lock on the output folder, training, final outputs."""
    from lora_alpaca.train.loop import DiskFull, InterruptedTraining, TrainingStopped, train_loop
    from lora_alpaca.train.outputs import output_dir_problem

    accelerator, quantization, precision = _setup_accelerator(cfg)
    resume = _setup_resume(cfg, resume_path, prepared.fingerprint, accelerator)
    model, peft_model = _setup_model(cfg, ref, precision, quantization, accelerator)
    # Every input check has passed: lock the folder before the first write to it (the
    # lock creates it), so two runs started at once cannot both write there.
    if lock is not None:
        lock.acquire()
        # Both may have passed the emptiness check before either held the lock.
        if not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
            problem = output_dir_problem(output_dir)
            if problem:
                raise UsageError(problem)
    prepared.save_cache()  # now the tokenized data may be cached
    if cfg.overwrite_output_dir and accelerator.is_main_process and output_dir.exists():
        log(f"--overwrite_output_dir: deleting the previous run in {output_dir}")
        remove_run_folder_contents(output_dir)
    accelerator.wait_for_everyone()
    train_rows, val_rows = _setup_data(prepared)
    sink = metrics_sink(cfg, output_dir) if accelerator.is_main_process else None

    # ---- train
    resume_cmd = f"{sys.executable} {' '.join(sys.argv)}"
    if "--resume_from_checkpoint" not in resume_cmd:
        resume_cmd += " --resume_from_checkpoint auto"
    try:
        pos = train_loop(
            cfg, accelerator, peft_model, train_rows, val_rows, precision,
            tokenizer.pad_token_id, prepared.fingerprint, resume, log, sink,
        )  # fmt: skip
    except InterruptedTraining as e:
        last = ckpt.find_latest(output_dir)
        log(f"interrupted at step {e.position.global_step}; checkpoint and adapter so far: {last}")
        log(f"resume with: {resume_cmd}")
        return 128 + e.signum
    except DiskFull as e:
        last = ckpt.find_latest(output_dir)
        # A leading newline: the progress bar's line has no end yet.
        log(f"\nerror: {e}; last good checkpoint: {last or 'none yet'}")
        log(f"free some space, then resume with: {resume_cmd}")
        return 2
    except TrainingStopped as e:
        last = ckpt.find_latest(output_dir)
        log(f"error: training stopped: {e}")
        log(f"last good checkpoint: {last or 'none yet'}")
        return 3

    # ---- cleanup: only the main process writes; the adapter is read back and checked.
    # Under FSDP the LoRA weights are sharded: gathered whole to rank 0 (collective), so
    # the adapter written is a plain PEFT adapter that loads on one device.
    full = (
        distributed.full_trainable_state(peft_model) if distributed.is_fsdp(accelerator) else None
    )
    if accelerator.is_main_process:
        _write_outputs(cfg, started, output_dir, template, ref, tokenizer, prepared, renderer,
                       accelerator, model, peft_model, quantization, precision, pos,
                       len(train_rows), len(val_rows), full)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _write_outputs(cfg, started, output_dir, template, ref, tokenizer, prepared, renderer,
                   accelerator, model, peft_model, quantization, precision, pos, n_train, n_val,
                   full=None):  # fmt: skip
    """The final adapter folder (manifest, run.json, card), read back and checked."""
    from lora_alpaca.models import config_fingerprint
    from lora_alpaca.progress import stage
    from lora_alpaca.runfolder import build_manifest
    from lora_alpaca.train.lora_setup import verify_saved_adapter
    from lora_alpaca.train.outputs import library_versions, write_final_outputs

    final_train = pos.history[-1]["loss"] if pos.history else None
    final_eval = pos.eval_history[-1]["eval_loss"] if pos.eval_history else None
    lora = {k: getattr(cfg, k) for k in LORA_KEYS}
    manifest = build_manifest(
        base_model_name=ref.name,
        base_model_path=ref.path,
        base_config_fingerprint=config_fingerprint(model.config),
        model_type=model.config.model_type,
        template=template,
        tokenizer=tokenizer,
        train_on_inputs=cfg.train_on_inputs,
        add_eos_token=cfg.add_eos_token,
        cutoff_len=cfg.cutoff_len,
        quantization=quantization,
        dtype=precision.label,
        lora=lora,
    )
    manifest["data_format"] = prepared.audit.conversation.get("format", "alpaca")
    manifest["chat_template"] = renderer.to_manifest()
    tokenizer.chat_template = renderer.jinja_source  # saved with the adapter
    run_info = {
        "config": cfg.to_dict(),
        "versions": library_versions(),
        "data": {
            "path": str(expand_user(cfg.data).resolve())
            if expand_user(cfg.data).exists()
            else cfg.data,
            "fingerprint": prepared.fingerprint,
            "train_rows": n_train,
            "val_rows": n_val,
            "val_sample": val_sample(cfg, prepared),
        },
        "audit": {
            k: getattr(prepared.audit, k)
            for k in ("rows_read", "rows_kept", "skipped", "truncated_rows")
            + ("total_tokens", "supervised_tokens")
        },
        "seed": cfg.seed,
        "world_size": accelerator.num_processes,
        "sharding": "fsdp2" if distributed.is_fsdp(accelerator) else None,
        "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "quantization": quantization,
        "dtype": precision.label,
        "steps": pos.global_step,
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(pos.wall_time_s, 2),
        "tokens_seen": pos.tokens_seen,
        "tokens_per_s": round(pos.tokens_this_run / max(pos.wall_time_s, 1e-9), 1),
        "final_train_loss": final_train,
        "final_eval_loss": final_eval,
        "history": pos.history,
        "eval_history": pos.eval_history,
    }
    with stage(f"saving the adapter, tokenizer, card and loss curve to {output_dir}", "saved"):
        write_final_outputs(output_dir, peft_model, tokenizer, manifest, run_info, pos.history,
                            pos.eval_history, state_dict=full)  # fmt: skip
    check = verify_saved_adapter(peft_model, output_dir, pos.global_step > 0, state_dict=full)
    log(
        f"adapter verified: {check['lora_modules']} LoRA modules, {check['nonzero_lora_B']} trained lora_B, {check['bytes']:,} bytes"
    )
    log(
        f"done: {output_dir} ({human_summary(final_train, final_eval, run_info['tokens_per_s'], run_info.get('wall_time_s'))})"
    )
