"""Tiny random causal LMs with a real (trained-on-the-spot) BPE tokenizer, saved to disk.

Fast unit tests need a model that loads through the same `from_pretrained` code as a real
one; a 2-layer LLaMA / Mistral / Qwen2 config with hidden size 64 does in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate the sentence into French. Ci-dessous se trouve une instruction qui décrit une tâche.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_+=*/\\@#$%^&|~`",
    "Classify the sentiment of the review as positive or negative. positive negative neutral",
]


def make_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    tie: bool = False,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    edit=None,
) -> Path:
    """Write a tiny random model + tokenizer to `out_dir` and return it. `edit(model)`, if
    given, changes the random weights (under no_grad) before saving."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie,
    )
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(out_dir)
    return out_dir
