"""More than one process: the Accelerator (DDP, or FSDP2 from an accelerate config / --fsdp),
and the training state that under FSDP2 lives in shards on every rank.

accelerate wraps the model (`fully_shard` per decoder layer) and the optimizer; what it
lacks is written here, each with its reason: FSDP on CPU processes (the tests), a wrap
policy for a model hidden inside our loss module, and checkpoints in our own atomic
format (accelerate's `save_state` writes in place and pickles the RNG state).

Every function here that gathers is a collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import os

import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.log import log


def fsdp_plugin(shortcut: bool):
    """The FSDP2 plugin from `accelerate launch --config_file fsdp2.yaml` (its FSDP_*
    environment), or from finetune.py's --fsdp; None for DDP / one process."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (from_launcher or shortcut):
        return None
    # finetune.py loads the full base on every rank, then accelerate shards it; the
    # rank-0-only loading of transformers + accelerate is not wired in (it would leave
    # the other ranks' LoRA on the meta device).
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    from accelerate.utils import FullyShardedDataParallelPlugin

    if from_launcher:
        plugin = FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False)
    else:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    if plugin.fsdp_version != 2:
        raise UsageError(
            "accelerate config: fsdp_version 1 is not supported; use fsdp_version: 2 "
            "(configs/fsdp2.yaml)"
        )
    if plugin.activation_checkpointing:
        raise UsageError(
            "accelerate config: fsdp_activation_checkpointing is not supported (it renames the "
            "layers the LoRA lives in); set it to false and pass --gradient_checkpointing true"
        )
    return plugin


def make_accelerator(fsdp_shortcut: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    plugin = fsdp_plugin(fsdp_shortcut)
    # cpu=True on machines without a GPU: otherwise accelerate ignores torchrun's WORLD_SIZE
    # on CPU and every process trains alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate (1.15) turns FSDP on only for GPU-like backends and silently falls back
        # to DDP on CPU processes, while torch's fully_shard runs over gloo. Setting its
        # state makes `prepare` take accelerate's own FSDP2 path, the one GPUs take: the
        # CPU tests check that path, not a copy of it.
        from accelerate.state import PartialState

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        # As accelerate does for GPUs (state.py): every later AcceleratorState() copies
        # PartialState's type back over its own.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        log("note: FSDP needs more than one process; training on one without sharding")
    return accelerator


def check_world_size(trainer_state: dict, world: int, force: bool) -> None:
    """Each rank resumes its own RNG stream (and, under FSDP, its optimizer shard layout is
    the saved run's): the process count must stay the same."""
    saved = trainer_state.get("world_size")
    if saved is None or saved == world:
        return
    msg = (
        f"--resume_from_checkpoint: the checkpoint was written by {saved} process(es), this run "
        f"has {world}; resume with {saved}"
    )
    if not force:
        raise UsageError(msg + ", or pass --force_resume (dropout streams then differ)")
    log(
        f"warning: {msg}; --force_resume: continuing, ranks without a saved RNG state keep the seeded one"
    )


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_quantization(accelerator, asked: str, resolved: str) -> str:
    """A quantized base under FSDP2 is not supported yet: bitsandbytes' int8 / uint8
    storage cannot be sharded (QLoRA + FSDP needs bnb_4bit_quant_storage = the compute
    dtype, and GPUs). `auto` means no quantization there; asking for it is refused."""
    if not is_fsdp(accelerator) or resolved == "none":
        return resolved
    if asked == "auto":
        return "none"
    raise UsageError(
        f"--quantization {asked}: not supported with FSDP yet (its weights cannot be sharded); "
        "use --quantization none, or DDP"
    )


def set_wrap_classes(accelerator, model) -> None:
    """Shard per decoder layer of THIS model: accelerate reads `_no_split_modules` from the
    module it prepares, which is our loss wrapper (it has none), so name them here."""
    if not is_fsdp(accelerator):
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return  # size-based or no wrap: the user's choice, used as given
    if not plugin.transformer_cls_names_to_wrap:
        names = list(getattr(model, "_no_split_modules", None) or [])
        if not names:
            raise UsageError(
                f"FSDP: {type(model).__name__} names no decoder-layer class (_no_split_modules); "
                "set fsdp_transformer_layer_cls_to_wrap in the accelerate config"
            )
        plugin.transformer_cls_names_to_wrap = names
    log(f"FSDP2: sharding each {', '.join(plugin.transformer_cls_names_to_wrap)}")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_trainable_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole, on the CPU of rank 0 ({} on the others), keyed as
    `peft_model.state_dict()` keys them. Gathers only the trainable tensors (cost: one
    all-gather of the adapter), never the frozen base."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(
        peft_model, options=_options(cpu_offload=True, ignore_frozen_params=True)
    )


def adapter_state(peft_model, accelerator) -> dict[str, torch.Tensor] | None:
    """The adapter in PEFT's file layout; under FSDP gathered to rank 0 (collective)."""
    from peft import get_peft_model_state_dict

    if is_fsdp(accelerator):
        full = full_trainable_state(peft_model)
        if not accelerator.is_main_process:
            return None
        return get_peft_model_state_dict(peft_model, state_dict=full)
    if not accelerator.is_main_process:
        return None
    return get_peft_model_state_dict(peft_model)


def optimizer_state(peft_model, optimizer, accelerator) -> dict | None:
    """Under FSDP: the whole optimizer state keyed by parameter names, on rank 0
    (collective); else the optimizer's own state_dict (every rank holds all of it)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(
            peft_model, _raw(optimizer), options=_options(cpu_offload=True)
        )
        return state if accelerator.is_main_process else None
    return optimizer.state_dict() if accelerator.is_main_process else None


def load_optimizer_state(peft_model, optimizer, state: dict, accelerator) -> None:
    """After `prepare`. A state keyed by parameter names (written under FSDP): every rank
    takes its shard of it (or all of it, unsharded); one keyed by position: as saved."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    groups = state.get("param_groups") or [{}]
    by_name = any(isinstance(i, str) for i in groups[0].get("params", []))
    if by_name:
        set_optimizer_state_dict(peft_model, _raw(optimizer), state, options=_options())
    elif is_fsdp(accelerator):
        raise UsageError(
            "--resume_from_checkpoint: this checkpoint was written without FSDP; resume it "
            "without FSDP (the same launcher and flags as the run that wrote it)"
        )
    else:
        optimizer.load_state_dict(state)


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's


def gather_rng_states(accelerator, mine: dict[str, torch.Tensor]) -> list[dict] | None:
    """Every rank's own RNG state, on rank 0 (collective; None on the others). Each rank's
    dropout stream is its own: restoring rank 0's everywhere would change the run."""
    if accelerator.num_processes == 1:
        return [mine]
    out = []
    for key in sorted(mine):  # same keys, same shapes on every rank
        t = mine[key].to(accelerator.device)
        gathered = [torch.empty_like(t) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(gathered, t)
        out.append((key, [g.cpu() for g in gathered]))
    if not accelerator.is_main_process:
        return None
    return [{key: vals[r] for key, vals in out} for r in range(accelerator.num_processes)]
