"""The adapter alone as a GGUF file in llama.cpp's LoRA adapter format (`llama-cli --lora`,
Ollama's `ADAPTER`), beside a GGUF of the unmerged base it applies to, and a reader that
applies such a file to a base GGUF in transformers for the parity check.

Format, as llama.cpp's `convert_lora_to_gguf.py` writes it and `llama-adapter.cpp` reads it
(that converter is a script that needs the base model's code path and the hub; the format
itself is small, so it is written here): `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha` (f32), the base's `general.architecture`, and per adapted weight W
two tensors `<W's GGUF name>.lora_a` (numpy shape [r, in]) and `.lora_b` ([out, r]).
llama.cpp scales B·A by alpha / r with r read from lora_b (alpha 0 means scale 1). The
LLaMA q/k row permutation of the base applies to the rows of B. Token-embedding / lm_head
LoRA, DoRA and trained full modules (`modules_to_save`) are refused, not approximated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lora_alpaca.errors import UsageError

LORA_TYPES = ("f16", "q8_0")


def adapter_file_name(qtype: str) -> str:
    return f"adapter-{qtype}.gguf"


def base_file_name(qtype: str) -> str:
    return f"base-{qtype}.gguf"


def lora_weights(peft_model) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(HF module name, A [r, in], B [out, r], scaling) for every LoRA layer; refuses what
    llama.cpp's adapter format cannot carry."""
    from peft.tuners.lora import LoraLayer

    config = next(iter(peft_model.peft_config.values()))
    if getattr(config, "use_dora", False):
        raise UsageError(
            "--gguf_lora: this adapter uses DoRA, which llama.cpp's LoRA format cannot "
            "carry; use the merged GGUF (--gguf) instead"
        )
    if getattr(config, "modules_to_save", None):
        raise UsageError(
            f"--gguf_lora: this adapter trains whole modules ({', '.join(config.modules_to_save)}), "
            "which llama.cpp's LoRA format cannot carry; use the merged GGUF (--gguf) instead"
        )
    out = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.lora_A:
            continue
        (key,) = module.lora_A.keys()  # export attaches exactly one adapter
        if key not in module.lora_B or not hasattr(module.lora_A[key], "weight"):
            raise UsageError(f"--gguf_lora: LoRA layer {name!r} is not a plain linear LoRA")
        hf_name = name.removeprefix("base_model.model.")
        if hf_name.endswith(("embed_tokens", "lm_head")):
            raise UsageError(
                f"--gguf_lora: the adapter targets {hf_name!r}; embedding/output LoRA is not "
                "exported to GGUF yet, use the merged GGUF (--gguf) instead"
            )
        a = module.lora_A[key].weight.detach().to(torch.float32).cpu()
        b = module.lora_B[key].weight.detach().to(torch.float32).cpu()
        out.append((hf_name, a, b, float(module.scaling[key])))
    if not out:
        raise UsageError("--gguf_lora: the adapter has no LoRA layers")
    return out


def _encode(w: np.ndarray, qtype: str):
    """(array, raw ggml type or None): q8_0 where rows split into 32-wide blocks, else f16
    (a rank-8 B has 8-wide rows; llama.cpp's converter falls back the same way)."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    if qtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
        return gguf.quants.quantize(w.astype(np.float32), q8), q8
    return w.astype(np.float16), None


def write_gguf_lora(peft_model, path: Path, qtype: str, name: str) -> Path:
    """Write `peft_model`'s LoRA layers as a llama.cpp adapter GGUF at `path`."""
    import gguf

    from lora_alpaca.export.gguf import _permute_qk, check_supported

    if qtype not in LORA_TYPES:
        raise UsageError(f"--gguf_lora {qtype!r}: allowed: {', '.join(LORA_TYPES)}")
    cfg = peft_model.base_model.model.config
    arch = check_supported(cfg)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    layers = lora_weights(peft_model)
    # One alpha per file; llama.cpp divides it by each tensor's own rank. Layers whose
    # scaling differs (rank_pattern / alpha_pattern / rsLoRA mixes) get it folded into B.
    alpha = layers[0][3] * layers[0][1].shape[0]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    w.add_name(name)
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    )
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf_name, a, b, scaling in layers:
        gguf_base = name_map.get_name(hf_name)
        if gguf_base is None:
            raise UsageError(
                f"--gguf_lora: no GGUF name for {hf_name!r}; architecture not supported"
            )
        rank = a.shape[0]
        b = b.numpy() * (scaling * rank / alpha)  # 1.0 unless the scalings differ
        if gguf_base.endswith(".attn_q"):
            b = _permute_qk(b, n_head)
        elif gguf_base.endswith(".attn_k"):
            b = _permute_qk(b, n_kv)
        for suffix, arr in (("lora_a", a.numpy()), ("lora_b", b)):
            data, raw = _encode(arr, qtype)
            w.add_tensor(f"{gguf_base}.weight.{suffix}", data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of gguf._permute_qk (rows back into transformers' rotary layout)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_gguf_lora(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {GGUF weight name: (A, B)}) dequantized to fp32, as llama.cpp would load them."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha_field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    alpha = float(alpha_field.parts[alpha_field.data[0]][0])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        pairs.setdefault(base, {})[suffix] = arr.reshape([int(n) for n in reversed(t.shape)])
    return alpha, {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()}


def apply_gguf_lora(model, path: Path):
    """Add the adapter GGUF's B·A (scaled as llama.cpp scales it) into `model` (a base GGUF
    read back through transformers, in place); returns the model."""
    import gguf

    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    alpha, pairs = read_gguf_lora(path)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    modules = {
        f"{name_map.get_name(n)}.weight": m
        for n, m in model.named_modules()
        if name_map.get_name(n) is not None and hasattr(m, "weight")
    }
    with torch.no_grad():
        for gguf_name, (a, b) in pairs.items():
            if gguf_name.endswith(".attn_q.weight"):
                b = _unpermute_qk(b, n_head)
            elif gguf_name.endswith(".attn_k.weight"):
                b = _unpermute_qk(b, n_kv)
            scale = alpha / b.shape[1] if alpha else 1.0
            weight = modules[gguf_name].weight
            weight += torch.from_numpy(scale * (b @ a)).to(weight.dtype)
    return model


def write_lora_files(info, cfg, qtype: str, out: Path, tokenizer, renderer, name: str) -> None:
    """base-<qtype>.gguf (the unmerged base, through the same writer as the merged file, so
    tensor names and layout match the adapter) and adapter-<qtype>.gguf. Costs one more
    fp32 load of the base."""
    from lora_alpaca.export.adapter import attach_adapter, load_base
    from lora_alpaca.export.gguf import write_gguf

    base = load_base(info, "none", cfg.allow_pickle, cfg.trust_remote_code)
    write_gguf(
        base,
        tokenizer,
        info.template,
        out / base_file_name(qtype),
        qtype,
        f"{info.manifest['base_model']['name']}",
        stop_strings=info.stop_strings,
        renderer=renderer,
    )
    write_gguf_lora(attach_adapter(base, info), out / adapter_file_name(qtype), qtype, name)


def lora_parity(out: Path, refs, qtype: str, eos, tolerances: dict) -> dict:
    """base GGUF + adapter GGUF (applied as llama.cpp applies it) vs base + PEFT adapter."""
    from lora_alpaca.export.gguf import load_gguf_model
    from lora_alpaca.export.parity import compare

    model, _ = load_gguf_model(out / base_file_name(qtype))
    apply_gguf_lora(model, out / adapter_file_name(qtype))
    label = f"gguf lora {qtype} on base {qtype}"
    return compare(refs, model, tolerances[f"gguf-{qtype}"], eos, label)
