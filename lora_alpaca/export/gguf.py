"""Write a merged model as one GGUF file (f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0) for
llama.cpp / Ollama / LM Studio.

The `gguf` package does the file format, the tensor-name map and the 32-wide block packing;
export/quants.py has llama.cpp's per-tensor type mix and the K-quant packing. What it
lacks is the glue llama.cpp's `convert_hf_to_gguf.py` holds (a script, not an importable
API): the LLaMA q/k row permutation, the choice of tokenizer pre-type, the hyperparameter
keys. That glue is here, for the LLaMA architecture family only (LLaMA, SmolLM, Mistral
without an active sliding window); other architectures get a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lora_alpaca.errors import UsageError
from lora_alpaca.export.quants import FILE_TYPES, quantize, tensor_type
from lora_alpaca.log import no_gguf_progress_bar
from lora_alpaca.prompts import PromptTemplate

GGUF_TYPES = tuple(FILE_TYPES)
# HF `model_type` -> llama.cpp architecture; llama.cpp runs Mistral as plain LLaMA.
SUPPORTED_ARCHS = {"llama": "llama", "mistral": "llama"}
# Byte-level BPE pre-tokenizers we can name for llama.cpp (`tokenizer.ggml.pre`). llama.cpp
# picks the pre-type by hashing sample tokenizations; we recognise the tokenizer.json shape.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_file_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def check_supported(config) -> str:
    """The llama.cpp architecture for this config, or a one-line error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise UsageError(
            f"--gguf: architecture {model_type!r} is not supported by the GGUF exporter yet "
            f"(supported: {', '.join(SUPPORTED_ARCHS)}); export without --gguf and convert with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type not in ("default", "linear"):
        raise UsageError(
            f"--gguf: rope scaling {rope_type!r} is not supported by the GGUF exporter yet"
        )
    return SUPPORTED_ARCHS[model_type]


def _pre_tokenizer_type(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"]:
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex == LLAMA3_SPLIT:
                return "llama-bpe"
    raise UsageError(
        f"--gguf: this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one the GGUF "
        "exporter can name for llama.cpp yet; export without --gguf"
    )


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """tokens / token types / merges / special ids, as llama.cpp's `gpt2` BPE model wants."""
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        # sentencepiece-style vocabularies (LLaMA-2, Mistral v0.1) need `llama` + scores;
        # not written yet, and a wrong vocabulary would make garbage, so refuse.
        raise UsageError(
            f"--gguf: only byte-level BPE tokenizers (gpt2-style, as SmolLM/LLaMA-3) are supported "
            f"by the GGUF exporter yet; this one is {model.get('type')!r}"
            f"{' with byte fallback (sentencepiece)' if model.get('byte_fallback') else ''}"
        )
    pre = _pre_tokenizer_type(tok_json)
    import gguf

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    if max(by_id) >= n_vocab:
        raise UsageError(
            f"--gguf: tokenizer has ids up to {max(by_id)} but the model only {n_vocab} rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows padded beyond the tokenizer, as llama.cpp does
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }


def _jinja_literal(text: str) -> str:
    # json.dumps gives a double-quoted string with \n / \" / \uXXXX escapes, which Jinja's
    # string literal decodes the same way; so arbitrary template text survives.
    return "{{ " + json.dumps(text) + " }}"


def chat_template_for(template: PromptTemplate) -> str:
    """A Jinja chat template that renders the adapter's (single-turn) prompt from the last
    user message, so GGUF runtimes build the prompt the adapter was trained on."""
    before, after = template.prompt_no_input.split("{instruction}", 1)
    before, after = (
        before.replace("{{", "{").replace("}}", "}"),
        after.replace("{{", "{").replace("}}", "}"),
    )
    return (
        "{%- set ns = namespace(instruction='') -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
        "{%- set ns.instruction = message['content'] -%}{%- endif -%}{%- endfor -%}"
        + _jinja_literal(before)
        + "{{ ns.instruction }}"
        + _jinja_literal(after)
    )


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (transformers' GGUF reader undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model,
    tokenizer,
    template: PromptTemplate,
    path: Path,
    qtype: str,
    name: str,
    stop_strings: tuple[str, ...] | None = None,
    renderer=None,
) -> Path:
    """Write `model` (fp32, merged) to `path` as a single GGUF file; `renderer` (a
    ChatRenderer) gives the chat template and end-of-turn id (else the single-turn form)."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise UsageError(f"--gguf {qtype!r}: allowed: {', '.join(GGUF_TYPES)}")
    cfg = model.config
    arch = check_supported(cfg)
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    state = model.state_dict()
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    tok = tokenizer_metadata(tokenizer, n_vocab)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    rope = getattr(cfg, "rope_parameters", None) or {}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, tid in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    w.add_chat_template(renderer.jinja_source if renderer else chat_template_for(template))
    extra_eog = [
        i for i in (renderer.eog_token_ids if renderer else []) if i != tokenizer.eos_token_id
    ]
    if extra_eog:  # the template's end-of-turn token (ChatML <|im_end|> beside a separate EOS)
        w.add_eot_token_id(extra_eog[0])
    # Not llama.cpp keys (it ignores unknown ones): the exact prompt format and stops, for
    # people writing an Ollama Modelfile or a frontend preset by hand.
    w.add_string("lora_alpaca.prompt_template", json.dumps(template.to_dict()))
    w.add_array("lora_alpaca.stop_strings", list(stop_strings or template.stop_strings) or [""])

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise UsageError(
                f"--gguf: no GGUF name for tensor {hf_name!r}; architecture not supported"
            )
        arr = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_base.endswith(".attn_q"):
            arr = _permute_qk(arr, n_head)
        elif gguf_base.endswith(".attn_k"):
            arr = _permute_qk(arr, n_kv)
        gguf_name = f"{gguf_base}.{suffix}"
        ggml_type = tensor_type(gguf_name, arr.shape, qtype, n_layers, tied)
        raw = (
            None
            if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else ggml_type
        )
        w.add_tensor(gguf_name, quantize(arr, ggml_type), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_gguf_model(path: Path):
    """Read a GGUF back through transformers' own GGUF loader (dequantized, fp32).

    Read from a folder holding nothing but a link to the file: next to a transformers
    export, `from_pretrained(folder, gguf_file=...)` would also pick up that folder's
    config/tokenizer files, and the check would no longer be about the GGUF alone.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gguf-read-") as alone:
        link = Path(alone) / path.name
        link.symlink_to(Path(path).resolve())
        with no_gguf_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(
                alone, gguf_file=path.name, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
    return model.eval(), tokenizer
