"""Wrap a base model with LoRA (peft), and check the adapter that comes out of training.

alpaca-lora "succeeded" while saving 443-byte empty adapters (a monkey-patched
`state_dict`); here the saved file is read back and checked against the model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lora_alpaca.errors import UsageError

# Layers peft can put LoRA on, by class name (bitsandbytes' and transformers' Conv1D too).
LINEAR_CLASSES = ("Linear", "Linear8bitLt", "Linear4bit", "Conv1D")


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names (`q_proj`, `up_proj`...) of the linear layers a LoRA could target."""
    names = set()
    output = model.get_output_embeddings()
    for full, module in model.named_modules():
        if type(module).__name__ in LINEAR_CLASSES and module is not output:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    if targets == ["all-linear"]:
        return
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available and not re.search(r"[.*\\\[]", t)]
    if unknown:
        raise UsageError(
            f"--lora_target_modules: no module named {', '.join(unknown)} in this model; "
            f"available: {', '.join(available)} (or all-linear)"
        )


def keep_bnb_cpu_weights_trainable(model: nn.Module) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight into an
    inference-only layout the first time it runs in eval mode without grad (our eval pass),
    and every later forward then goes through `gemv_4bit`, which has no autograd: gradients
    silently stop reaching the LoRA weights (every lora_B stays 0). Opt out of that repack
    for models we train."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_lora(model: nn.Module, cfg, quantized: bool) -> nn.Module:
    """The peft model with LoRA on `cfg.lora_target_modules`; only LoRA weights train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, cfg.lora_target_modules)
    if quantized:
        keep_bnb_cpu_weights_trainable(model)
        # Casts norms to fp32 and freezes the base; the peft-documented path for k-bit training.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise UsageError(
            f"--lora_target_modules {','.join(targets)}: {' '.join(str(e).split())[:300]}"
        ) from None
    if cfg.init_from_adapter:
        load_adapter_weights(peft_model, cfg.init_from_adapter)
    if getattr(cfg, "packing", False):
        # Packed micro-batches: attention only inside each row (train/packed_attention.py).
        from lora_alpaca.train.packed_attention import use_packed_attention

        use_packed_attention(peft_model.get_base_model())
    if not quantized:  # bitsandbytes layers have their own dtype handling: left alone
        skip_lora_input_casts(peft_model)
    # On CPU, the dropout mask from a quarter of the random draws (train/dropout.py); on a
    # GPU the same modules run nn.Dropout's own path.
    from lora_alpaca.train.dropout import use_cpu_dropout

    use_cpu_dropout(peft_model)
    return peft_model


def skip_lora_input_casts(peft_model) -> None:
    """peft casts a LoRA layer's input to the LoRA weights' dtype (fp32) before dropout and
    lora_A; under bf16 autocast lora_A then casts it straight back to bf16. With a bf16
    base that is two [tokens, hidden] copies per adapted layer, forward and backward, plus
    the dropout done in fp32 (profiled in BENCHMARKS.md). Without a bf16 base (fp32 runs)
    the input already has the weights' dtype and this changes nothing."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def check_init_adapter(cfg) -> None:
    """--init_from_adapter against this run's LoRA config, before the model loads (the
    tensor-by-tensor check in load_adapter_weights comes only after it): the folder holds
    safetensors weights whose rank agrees with its adapter_config.json and --lora_r."""
    import json

    from lora_alpaca.filecheck import check_adapter_shapes, loads_json
    from lora_alpaca.runfolder import MANIFEST_NAME

    d = Path(cfg.init_from_adapter)
    if not d.is_dir():
        raise UsageError(f"--init_from_adapter: no such folder {str(d)!r}")
    if not (d / "adapter_model.safetensors").is_file():
        raise UsageError(f"--init_from_adapter {d}: no adapter_model.safetensors there")
    manifest = None
    if (d / MANIFEST_NAME).is_file():
        try:
            manifest = loads_json((d / MANIFEST_NAME).read_text(encoding="utf-8"), str(d))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(
                f"--init_from_adapter {d}: {MANIFEST_NAME} is not valid JSON"
            ) from None
    check_adapter_shapes(d, "--init_from_adapter", manifest if isinstance(manifest, dict) else None)
    config = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    r = config.get("r")
    if not config.get("rank_pattern") and r is not None and r != cfg.lora_r:
        raise UsageError(
            f"--init_from_adapter {d}: adapter does not fit this LoRA setup (its rank is {r}, "
            f"--lora_r is {cfg.lora_r}); use --lora_r {r} and the same --lora_target_modules"
        )


def load_adapter_weights(peft_model, adapter_dir: str) -> None:
    """Weights-only warm start from an adapter folder (safetensors only: no pickle)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise UsageError(f"--init_from_adapter {adapter_dir}: no adapter_model.safetensors there")
    state = load_file(str(path))
    expected = {k: v.shape for k, v in lora_state_dict(peft_model).items()}
    bad = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    missing = [k for k in expected if k not in state]
    if bad or missing:
        raise UsageError(
            f"--init_from_adapter {adapter_dir}: adapter does not fit this LoRA setup "
            f"({len(missing)} missing, {len(bad)} wrong-shape tensors); use the same --lora_r and --lora_target_modules"
        )
    set_peft_model_state_dict(peft_model, state)


def lora_state_dict(peft_model, state_dict=None) -> dict[str, torch.Tensor]:
    """`state_dict`: the model's weights gathered whole, when they are sharded (FSDP)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state_dict)


def verify_saved_adapter(
    peft_model, adapter_dir: Path, expect_trained: bool, state_dict=None
) -> dict:
    """Read the saved adapter back and check it is the one in memory, and not empty."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"adapter check failed: {path} was not written")
    saved = load_file(str(path))
    memory = lora_state_dict(peft_model, state_dict)
    problems = []
    if set(saved) != set(memory):
        problems.append(f"{len(set(memory) ^ set(saved))} tensors differ between file and model")
    for key, value in memory.items():
        if key in saved and not torch.equal(saved[key].float(), value.detach().float().cpu()):
            problems.append(f"{key} differs from the trained weights")
            break
    targeted = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    for name in targeted:
        stem = name.split("base_model.model.", 1)[-1]
        if not any(stem in k and "lora_A" in k for k in saved) or not any(
            stem in k and "lora_B" in k for k in saved
        ):
            problems.append(f"module {stem} has no LoRA weights in the file")
            break
    if not targeted:
        problems.append("no module carries a LoRA")
    b_nonzero = sum(int(v.abs().sum() > 0) for k, v in saved.items() if "lora_B" in k)
    if expect_trained and b_nonzero == 0:
        problems.append("every lora_B is zero: the adapter is a no-op (did training run?)")
    payload = sum(v.numel() * v.element_size() for v in saved.values())
    size = path.stat().st_size
    if not payload <= size <= payload + 1_000_000:
        problems.append(f"file is {size} bytes, tensors need {payload}")
    if problems:
        raise RuntimeError("adapter check failed: " + "; ".join(problems))
    return {
        "tensors": len(saved),
        "lora_modules": len(targeted),
        "nonzero_lora_B": b_nonzero,
        "bytes": size,
    }
