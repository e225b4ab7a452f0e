"""Turn (instruction, input, output) into training ids and labels: the prompt masked with
-100 (unless `train_on_inputs`), EOS always the last learned token, fitted to `cutoff_len`.

The prompt and the response are tokenized separately and their ids concatenated, so the
first learned token is exactly the first response token and the prompt ids are exactly
what generation will feed the model (alpaca-lora tokenized the whole text and masked
`len(prompt ids)` tokens, which drifts by a token when BPE merges across the boundary).
User text is tokenized with `split_special_tokens=True`: a row containing the text
"<|im_end|>" must not inject a real EOS in the middle of an example.

Cutting an over-long row (`overlength=truncate`) keeps the template intact: the prompt is
cut first, by shortening the *text* of its longest field (input, then instruction) from
the end and re-rendering it, so the instruction header and the `### Response:` marker the
model answers after are always present; the prompt keeps at least half the token budget
while the response needs room. Then the response is cut from its end, and EOS is appended
after the cut (the model learns to stop where the example stops).

Note for SentencePiece tokenizers that prepend a space to a text's first word (LLaMA-1/2):
the response, tokenized on its own, starts with "▁word"; the model then learns to answer
with a leading space, which `PromptTemplate.get_response` strips. The ids stay consistent
with generation, which feeds the same prompt ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from lora_alpaca.constants import IGNORE_INDEX
from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import PromptTemplate


def bos_prefix(tokenizer) -> list[int]:
    """The special ids the tokenizer puts in front of a text by default (LLaMA: [BOS];
    SmolLM2, Qwen: []). Added once, at the very start of each example."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _plain_backend(tokenizer) -> bool:
    """True when the tokenizer class encodes by calling its Rust backend unchanged."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
    )


@dataclass
class EncodedBatch:
    """Per-row results of `Encoder.encode_rows`, aligned with the input rows."""

    ids: list[list[int] | None]  # None: dropped (over the limit) or error
    masked: np.ndarray  # leading tokens not learned (prompt, BOS)
    full_lengths: np.ndarray  # tokens the row would have uncut
    truncated: np.ndarray  # bool: row was cut (or, under drop/error, is over the limit)
    errors: list[int] = field(default_factory=list)
    error_messages: dict[int, str] = field(default_factory=dict)
    error_hint: str = ""

    @property
    def kept(self) -> np.ndarray:
        return np.array([x is not None for x in self.ids], dtype=bool)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) if x is not None else 0 for x in self.ids], dtype=np.int64)

    @property
    def supervised(self) -> np.ndarray:
        return self.lengths - self.masked

    def row(self, i: int) -> tuple[list[int], list[int]]:
        ids = self.ids[i]
        m = int(self.masked[i])
        return ids, [IGNORE_INDEX] * m + ids[m:]

    def arrow_columns(self, rows: np.ndarray, index: np.ndarray) -> dict:
        """input_ids / labels / length / row (source index) as arrow arrays, built from
        flat numpy buffers: ~100x faster than letting pyarrow walk 50K Python lists twice."""
        import pyarrow as pa

        lengths = np.array([len(self.ids[i]) for i in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(
            itertools.chain.from_iterable(self.ids[i] for i in rows),
            dtype=np.int32,
            count=int(offsets[-1]),
        )
        pos_in_row = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
        labels = np.where(pos_in_row < np.repeat(self.masked[rows], lengths), IGNORE_INDEX, flat)
        off32 = pa.array(offsets.astype(np.int32))
        return {
            "input_ids": pa.ListArray.from_arrays(off32, pa.array(flat)),
            "labels": pa.ListArray.from_arrays(off32, pa.array(labels.astype(np.int32))),
            "length": pa.array(lengths.astype(np.int32)),
            "row": pa.array(np.asarray(index, dtype=np.int64)),
        }


class Encoder:
    """Tokenization settings resolved once against a tokenizer and a template."""

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        cutoff_len: int,
        train_on_inputs: bool,
        add_eos_token: bool,
        overlength: str,
    ):
        self.tokenizer, self.template = tokenizer, template
        self.cutoff_len, self.train_on_inputs, self.overlength = (
            cutoff_len,
            train_on_inputs,
            overlength,
        )
        self.bos = bos_prefix(tokenizer)
        self.eos = [tokenizer.eos_token_id] if add_eos_token else []
        self.budget = cutoff_len - len(self.bos) - len(self.eos)  # for prompt + response
        if self.budget < 1:
            raise UsageError(
                f"--cutoff_len {cutoff_len}: leaves no room for text after the "
                f"{len(self.bos) + len(self.eos)} special token(s)"
            )

    def encode(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        backend = getattr(tok, "_tokenizer", None)
        if _plain_backend(tok) and hasattr(backend, "encode_batch_fast"):
            # Exactly what `tok(texts, add_special_tokens=False, split_special_tokens=True)`
            # does for a plain fast tokenizer, minus building offsets and attention masks
            # for 50K rows (a third of the tokenization time).
            before = backend.encode_special_tokens
            backend.encode_special_tokens = True
            try:
                return [
                    e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)
                ]
            finally:
                backend.encode_special_tokens = before
        return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def fingerprint(self) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        spec = (
            backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        )
        extra = json.dumps([type(tok).__name__, self.bos, self.eos, "split_special_tokens"])
        return hashlib.sha256((spec + extra).encode()).hexdigest()[:32]

    def _decode_prefix(self, ids: list[int]) -> str:
        # A byte-level BPE cut can end inside a UTF-8 character: drop the replacement char.
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        ).rstrip("\ufffd")

    def shrink_prompt(self, instruction: str, input: str, target: int) -> list[int]:
        """Prompt ids of at most `target` tokens when possible (else the shortest reached),
        cutting the end of the longer field's text (input on ties), at least 1 token each."""
        # Only a field's first `target` tokens can survive: tokenize a generous text prefix
        # instead of a possibly huge field (the kept ids are decoded to text and the whole
        # prompt re-tokenized, so this never changes the result's consistency).
        limit = 32 * (target + 8)
        fields = [f[:limit] if len(f) > limit else f for f in (instruction, input)]
        field_ids = [self.encode([f])[0] if f else [] for f in fields]
        keep = [len(x) for x in field_ids]
        best: list[int] | None = None
        for _ in range(64):  # converges in 1-3 rounds; re-rendering can merge a token or two
            texts = [
                f if keep[k] == len(field_ids[k]) else self._decode_prefix(field_ids[k][: keep[k]])
                for k, f in enumerate(fields)
            ]
            ids = self.encode([self.template.build_prompt(texts[0], texts[1])])[0]
            if best is None or len(ids) < len(best):
                best = ids
            excess = len(ids) - target
            if excess <= 0:
                return ids
            k = 1 if keep[1] >= keep[0] else 0
            if keep[k] <= 1:
                k = 1 - k
            if keep[k] <= 1:
                break
            keep[k] = max(1, keep[k] - excess)
        return best

    def fit(self, instruction: str, input: str, prompt: list[int], response: list[int]):
        """(prompt, response, truncated) fitted to the budget, None to drop, or an error str."""
        if len(prompt) + len(response) <= self.budget:
            return prompt, response, False
        full = len(self.bos) + len(prompt) + len(response) + len(self.eos)
        if self.overlength == "drop":
            return None
        if self.overlength == "error":
            return f"{full} tokens, more than --cutoff_len {self.cutoff_len}"
        target = min(len(prompt), max(self.budget - len(response), self.budget // 2))
        if len(prompt) > target:
            prompt = self.shrink_prompt(instruction, input, target)
            if len(prompt) > self.budget:
                return (
                    f"cannot fit in --cutoff_len {self.cutoff_len}: the prompt template "
                    f"alone takes about {len(prompt)} tokens"
                )
        return prompt, response[: self.budget - len(prompt)], True

    def encode_rows(
        self, instructions: list[str], inputs: list[str], outputs: list[str]
    ) -> EncodedBatch:
        """Tokenize many rows with two batched calls (the fast tokenizer runs them in Rust)."""
        build = self.template.build_prompt
        prompts = self.encode([build(i, x) for i, x in zip(instructions, inputs, strict=True)])
        responses = self.encode(outputs)
        n = len(prompts)
        bos, eos, nb = self.bos, self.eos, len(self.bos)
        out = EncodedBatch(
            ids=[None] * n,
            masked=np.zeros(n, np.int64),
            full_lengths=np.zeros(n, np.int64),
            truncated=np.zeros(n, bool),
        )
        for i in range(n):
            p, r = prompts[i], responses[i]
            out.full_lengths[i] = nb + len(p) + len(r) + len(eos)
            fitted = self.fit(instructions[i], inputs[i], p, r)
            if fitted is None or isinstance(fitted, str):
                out.truncated[i] = True
                if isinstance(fitted, str):
                    out.errors.append(i)
                    out.error_messages[i] = fitted
                continue
            p, r, out.truncated[i] = fitted
            out.ids[i] = bos + p + r + eos
            out.masked[i] = 0 if self.train_on_inputs else nb + len(p)
        if out.errors:
            out.error_hint = (
                "--overlength truncate cuts long rows, --overlength drop skips them"
                if self.overlength == "error"
                else "raise --cutoff_len"
            )
        return out


def tokenize_example(
    instruction: str,
    input: str | None,
    output: str,
    tokenizer,
    template: PromptTemplate,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    overlength: str = "truncate",
) -> dict | None:
    """One row -> {"input_ids", "labels", "length", "truncated"}; None when `overlength`
    is "drop" and the row is too long; UsageError when it is "error" (or cannot fit)."""
    enc = Encoder(tokenizer, template, cutoff_len, train_on_inputs, add_eos_token, overlength)
    batch = enc.encode_rows([instruction], [input or ""], [output])
    if batch.errors:
        raise UsageError(f"example: {batch.error_messages[0]}; {batch.error_hint}")
    if batch.ids[0] is None:
        return None
    ids, labels = batch.row(0)
    return {
        "input_ids": ids,
        "labels": labels,
        "length": len(ids),
        "truncated": bool(batch.truncated[0]),
    }
