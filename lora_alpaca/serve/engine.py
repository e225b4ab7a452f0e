"""One batch of rows decoded together, token by token, with per-row settings.

Why not `model.generate`: one GenerationConfig holds one temperature, seed, stop list and
penalty for the whole batch, and its streamer and logits cover the batch as a block. A server
batches unrelated requests, so each row here keeps its own sampler (temperature, top_p, seeded
torch.Generator, presence/frequency penalties), its own stop strings, logprobs, cancel flag and
deadline, and streams its own text. The model forward, KV cache and left padding are the same
as `TextGenerator.generate` (position ids from the attention mask, as transformers does).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lora_alpaca.generate.engine import safe_stream_prefix
from lora_alpaca.prompts import cut_at_stop


@dataclass(frozen=True)
class RowSpec:
    """What one choice asks for (already validated and capped by the HTTP layer)."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # the template's stop strings + the request's
    top_logprobs: int | None = None  # None: no logprobs; else this many alternatives per token
    strip_leading: bool = False  # chat: no leading whitespace before the answer


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Final:
    finish_reason: str  # "stop", "length", "cancelled" or "timeout"
    text: str  # the whole answer (stop string and what follows removed)
    completion_tokens: int
    rest: Delta  # what the stream has not shown yet


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass
class Row:
    spec: RowSpec
    emit: Callable[[object], None]  # receives Delta / Final / Failed, from the engine thread
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which the row ends with "timeout"


class _RowState:
    def __init__(self, row: Row, tokenizer, device: torch.device):
        self.row, self.spec, self.tokenizer = row, row.spec, tokenizer
        self.generated: list[int] = []
        self.pending: list[TokenLogprob] = []  # logprobs not yet sent with a delta
        self.shown = ""
        self.done = False
        seed = row.spec.seed if row.spec.seed is not None else secrets.randbits(62)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def _visible(self, text: str) -> str:
        text = text.lstrip() if self.spec.strip_leading else text
        return text.rstrip("\ufffd")  # a multi-byte character still being generated

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is None:
            text = cut_at_stop(self._decode(), self.spec.stop)
        text = text.lstrip() if self.spec.strip_leading else text
        rest_text = text[len(self.shown) :] if text.startswith(self.shown) else ""
        self.done, self.reason = True, reason
        self.row.emit(
            Final(reason, text, len(self.generated), Delta(rest_text, tuple(self.pending)))
        )

    def _decode(self) -> str:
        return self.tokenizer.decode(self.generated, skip_special_tokens=True)

    def push(self, token: int, is_eos: bool, logprob: TokenLogprob | None) -> None:
        """Take one new token: end the row on EOS / a stop string / its length, else stream."""
        self.generated.append(token)
        if is_eos:
            self.finish("stop")
            return
        if logprob is not None:
            self.pending.append(logprob)
        text = self._decode()
        cut = cut_at_stop(text, self.spec.stop)
        if len(cut) < len(text):
            self.finish("stop", cut)
        elif len(self.generated) >= self.spec.max_new_tokens:
            self.finish("length", text)
        else:
            visible = self._visible(safe_stream_prefix(text, self.spec.stop))
            if len(visible) > len(self.shown) and visible.startswith(self.shown):
                delta, self.shown = visible[len(self.shown) :], visible
                self.row.emit(Delta(delta, tuple(self.pending)))
                self.pending = []


def _sample(logits: torch.Tensor, spec: RowSpec, gen: torch.Generator) -> int:
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (torch.cumsum(sorted_p, -1) - sorted_p) >= spec.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def run_batch(
    model, tokenizer, rows: list[Row], eos_ids: list[int], device, watermark=None
) -> list[str]:
    """Decode `rows` (one adapter already active) until each ends; events go to row.emit.
    `watermark`: a transformers WatermarkLogitsProcessor (--watermark), applied per row
    before sampling, as TextGenerator does. Returns each row's finish reason."""
    states = [_RowState(r, tokenizer, device) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    width = max(len(r.spec.prompt_ids) for r in rows)
    ids = torch.tensor(
        [[pad] * (width - len(r.spec.prompt_ids)) + list(r.spec.prompt_ids) for r in rows],
        device=device,
    )
    mask = torch.tensor(
        [[0] * (width - len(r.spec.prompt_ids)) + [1] * len(r.spec.prompt_ids) for r in rows],
        device=device,
    )
    penalised = any(r.spec.presence_penalty or r.spec.frequency_penalty for r in rows)
    counts = torch.zeros(len(rows), model.config.vocab_size, device=device) if penalised else None
    want_lp = any(r.spec.top_logprobs is not None for r in rows)
    past, step_ids = None, ids
    cache_kw = _cache_kwarg(model)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        while True:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                logits_to_keep=1,
                **({cache_kw: past} if past is not None else {}),
            )
            past = getattr(out, "cache", None) or out.past_key_values
            logits = out.logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, -1) if want_lp else None
            if counts is not None:
                pres = torch.tensor([r.spec.presence_penalty for r in rows], device=device)
                freq = torch.tensor([r.spec.frequency_penalty for r in rows], device=device)
                logits = logits - pres[:, None] * (counts > 0) - freq[:, None] * counts
            greedy = logits.argmax(-1).tolist()
            now = time.monotonic()
            next_ids = []
            for i, st in enumerate(states):
                if not st.done and st.row.cancel.is_set():
                    st.finish("cancelled")
                elif not st.done and now > st.row.deadline:
                    st.finish("timeout")
                if st.done:
                    next_ids.append(pad)
                    continue
                spec = st.spec
                if watermark is not None:  # its green list is seeded by the row's own ids
                    seq = torch.tensor([list(spec.prompt_ids) + st.generated], device=device)
                    row_logits = watermark(seq, logits[i : i + 1])[0]
                    tok = (
                        int(row_logits.argmax())
                        if spec.temperature == 0
                        else _sample(row_logits, spec, st.gen)
                    )
                else:
                    tok = greedy[i] if spec.temperature == 0 else _sample(logits[i], spec, st.gen)
                lp = None
                if spec.top_logprobs is not None:
                    lp = _token_logprob(tokenizer, logprobs[i], tok, spec.top_logprobs)
                if counts is not None:
                    counts[i, tok] += 1
                st.push(tok, tok in eos_ids, lp)
                next_ids.append(tok)
            if all(st.done for st in states):
                return [st.reason for st in states]
            step_ids = torch.tensor(next_ids, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            position = position[:, -1:] + 1


def _cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name warns)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        "cache"
        if "cache" in inspect.signature(type(base).forward).parameters
        else "past_key_values"
    )


def _token_logprob(tokenizer, row_lp: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    top: tuple[tuple[str, float], ...] = ()
    if k:
        values, idx = torch.topk(row_lp, k)
        top = tuple(
            (tokenizer.decode([int(i)]), float(v))
            for v, i in zip(values.tolist(), idx.tolist(), strict=True)
        )
    return TokenLogprob(tokenizer.decode([tok]), float(row_lp[tok]), top)
