"""Text generation shared by the sampler UI, the generate.py CLI and export's checks.

Decoding modes that really differ (alpaca-lora set temperature/top-p/top-k but never
`do_sample`, so under 4-beam search its sliders did nothing), a seed for repeatable samples,
stopping on EOS *and* on the template's stop strings (transformers' `stop_strings`), the
stop string cut from the returned text, the reason each answer ended, batched generation
with left padding, and streaming through transformers' `TextIteratorStreamer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import PromptTemplate, cut_at_stop

MODES = ("greedy", "sample", "beam")
FINISH_REASONS = ("eos", "stop_string", "length", "content_filter")


@dataclass(frozen=True)
class DecodingSettings:
    """How to pick tokens; only the fields of the chosen `mode` matter."""

    mode: str = "greedy"
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    num_beams: int = 4
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> DecodingSettings:
        """The settings from a command's config (GenerateConfig): every field of the same name,
        so a decoding flag is declared once and never copied by hand."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def validate(self) -> DecodingSettings:
        """Every bad setting in one one-line error naming its flag (one round trip for the
        user, as finetune.py's checks); returns self so calls can chain."""
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: allowed: {', '.join(MODES)}")
        problems = []
        # Every value is checked in every mode (a typo is a typo even when greedy ignores it).
        if not self.temperature >= 0:
            problems.append(f"--temperature {self.temperature}: must be >= 0")
        elif self.mode == "sample" and not self.temperature > 0:
            problems.append(
                f"--temperature {self.temperature}: must be > 0 (use --mode greedy for temperature 0)"
            )
        if self.num_beams < 1:
            problems.append(f"--num_beams {self.num_beams}: must be >= 1")
        elif self.mode == "beam" and self.num_beams < 2:
            problems.append(f"--num_beams {self.num_beams}: beam search needs >= 2 beams")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"--top_k {self.top_k}: must be >= 0 (0 turns top-k off)")
        if not self.repetition_penalty > 0:
            problems.append(
                f"--repetition_penalty {self.repetition_penalty}: must be > 0 (1.0 = off)"
            )
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens {self.max_new_tokens}: must be >= 1")
        elif not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(
                f"--min_new_tokens {self.min_new_tokens}: must be in 0 .. --max_new_tokens ({self.max_new_tokens})"
            )
        if problems:
            raise UsageError("; ".join(problems))
        return self


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the response, stop string and everything after it removed
    finish_reason: str  # "eos", "stop_string" or "length"
    new_tokens: int  # tokens generated up to (and including) the EOS or stop string


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's generation_config EOS."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def with_eog(eos_ids: Sequence[int], eog_ids: Sequence[int]) -> list[int]:
    """The EOS ids plus a chat renderer's end-of-generation ids (ChatML's `<|im_end|>` where
    the tokenizer's EOS is `<|endoftext|>`): a chat answer ends at its end-of-turn token."""
    return list(dict.fromkeys([*eos_ids, *(int(i) for i in eog_ids if i is not None)]))


def build_generation_config(
    settings: DecodingSettings,
    model,
    tokenizer,
    stop_strings: Sequence[str],
    eos_ids: Sequence[int] | None = None,
):
    """A GenerationConfig that sets only what the mode uses (so no sampler flag is silently inert)."""
    from transformers import GenerationConfig

    kwargs: dict = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,  # EOS suppressed until then
        eos_token_id=list(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=settings.repetition_penalty,
        stop_strings=list(stop_strings) or None,
    )
    if settings.mode == "sample":
        kwargs.update(
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            num_beams=1,
        )
    elif settings.mode == "beam":
        kwargs.update(do_sample=False, num_beams=settings.num_beams, early_stopping=True)
    else:
        kwargs.update(do_sample=False, num_beams=1)
    return GenerationConfig(**kwargs)


def finish(
    tokens: Sequence[int], tokenizer, eos_ids: Sequence[int], stop_strings: Sequence[str]
) -> GenerationResult:
    """Decode one row of new tokens, cut it at EOS / the first stop string, and say why it ended.

    Rows that finished early in a batch are padded (with pad, which may equal EOS), so the
    text is taken up to the first EOS and then searched for stop strings: a stop string
    before that EOS means the stop string ended the row.
    """
    tokens = [int(t) for t in tokens]
    eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    kept = tokens if eos_at is None else tokens[:eos_at]
    raw = tokenizer.decode(kept, skip_special_tokens=True)
    text = cut_at_stop(raw, stop_strings)
    if len(text) < len(raw):
        reason = "stop_string"
        count = _tokens_to_cover(kept, tokenizer, len(text))
    elif eos_at is not None:
        reason, count = "eos", eos_at + 1
    else:
        pad = tokenizer.pad_token_id
        count = len(tokens)
        while count and tokens[count - 1] == pad and pad not in eos_ids:
            count -= 1
        reason = "length"
    return GenerationResult(text=text.strip(), finish_reason=reason, new_tokens=count)


def _tokens_to_cover(tokens: list[int], tokenizer, n_chars: int) -> int:
    """How many tokens it took to reach the stop string (for token counts in reports):
    the fewest whose text runs past the kept `n_chars` (binary search; decoded length
    grows with the number of tokens)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid], skip_special_tokens=True)) > n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def safe_stream_prefix(text: str, stop_strings: Sequence[str]) -> str:
    """What a stream may show now: text before any stop string, minus a tail that could
    still become one (so `### Instr` is never flashed on screen and then taken back).

    Hand-written because TextIteratorStreamer knows nothing about stop strings.
    """
    text = cut_at_stop(text, stop_strings)
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


class _Cancelled(StoppingCriteria):
    """StoppingCriteria that ends generation of every row once `event` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class TextGenerator:
    """A loaded model + tokenizer + template, safe to share between UI request threads.

    One lock serialises use of the model: `disable_adapter()` (base-model comparison)
    and `torch.manual_seed` (repeatable samples) are process-wide state, so two requests
    interleaving would corrupt each other's answers.
    """

    def __init__(
        self, model, tokenizer, template: PromptTemplate, device: torch.device | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.stop_strings = tuple(template.stop_strings)
        self.device = device or next(model.parameters()).device
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.lock = threading.Lock()
        self.safeguards = None  # lora_alpaca.safeguards.guard.Safeguards: watermark + filter
        model.eval()

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    def _adapter_context(self, use_adapter: bool):
        if use_adapter or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    def prompt_for(self, instruction: str, input: str | None = None) -> str:
        return self.template.build_prompt(instruction, input or None)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def _encode(self, prompts: Sequence[str]):
        # Left padding: every row's last prompt token sits at the same position, so new
        # tokens of all rows are appended in lockstep (right padding would put them after pads).
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def context_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def within_context(self, settings: DecodingSettings, prompt_len: int) -> DecodingSettings:
        """max_new_tokens capped so prompt + answer fit the model's context: past it a
        model produces garbage (or runs until killed with a huge --max_new_tokens)."""
        ctx = self.context_len()
        if ctx and prompt_len + settings.max_new_tokens > ctx:
            cap = max(1, ctx - prompt_len)
            return dataclasses.replace(
                settings, max_new_tokens=cap, min_new_tokens=min(settings.min_new_tokens, cap)
            )
        return settings

    def _config(self, settings: DecodingSettings, eos_ids: Sequence[int]):
        return build_generation_config(
            settings, self.model, self.tokenizer, self.stop_strings, eos_ids
        )

    def _processors(self) -> list:
        """The watermark, when on: transformers' own WatermarkLogitsProcessor, passed as a
        custom processor so it acts *before* temperature/top-k/top-p (generation_config's
        watermarking_config applies it after them, where the default top_p 0.9 leaves few
        green tokens to pick from: z about 2 instead of 7 on SmolLM2, bench/watermark_rates.py)."""
        guard = self.safeguards
        mark = guard.watermark_processor(self.model, self.device) if guard else None
        return [] if mark is None else [mark]

    def _refused(self, text: str = "") -> GenerationResult:
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        return GenerationResult(self.safeguards.refusal, "content_filter", n)

    def generate(
        self,
        prompts: Sequence[str],
        settings: DecodingSettings,
        use_adapter: bool = True,
        eog_ids: Sequence[int] = (),
    ) -> list[GenerationResult]:
        """Generate for a batch of full prompts (already templated); with a content filter,
        flagged prompts are not generated and flagged answers are replaced by the refusal.
        `eog_ids`: a chat renderer's end-of-generation ids, stopped on besides EOS."""
        guard = self.safeguards
        if guard is None or guard.moderator is None:
            return self._generate(prompts, settings, use_adapter, eog_ids)
        blocked = [guard.check(p, "prompt") is not None for p in prompts]
        todo = [p for p, b in zip(prompts, blocked, strict=True) if not b]
        done = iter(self._generate(todo, settings, use_adapter, eog_ids) if todo else [])
        results = [self._refused() if b else next(done) for b in blocked]
        return [r if r.finish_reason == "content_filter" or not guard.check(r.text, "output")
                else self._refused(r.text) for r in results]  # fmt: skip

    def _generate(
        self,
        prompts: Sequence[str],
        settings: DecodingSettings,
        use_adapter: bool = True,
        eog_ids: Sequence[int] = (),
    ) -> list[GenerationResult]:
        settings.validate()
        eos = with_eog(self.eos_ids, eog_ids)
        with self.lock:
            enc = self._encode(prompts)
            settings = self.within_context(settings, enc["input_ids"].shape[1])
            config = self._config(settings, eos)
            torch.manual_seed(settings.seed)
            with torch.inference_mode(), self._adapter_context(use_adapter):
                out = self.model.generate(
                    **enc,
                    generation_config=config,
                    tokenizer=self.tokenizer,
                    logits_processor=self._processors(),
                )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        return [finish(row, self.tokenizer, eos, self.stop_strings) for row in new]

    def stream(
        self,
        prompt: str,
        settings: DecodingSettings,
        use_adapter: bool = True,
        eog_ids: Sequence[int] = (),
    ) -> Iterator[tuple[str, GenerationResult | None]]:
        """Yield (text so far, None) while generating, then (final text, result) once.

        Beam search cannot stream in transformers (it only knows the best beam at the
        end), so in beam mode this yields the final answer only. With a content filter the
        text arrives window by window, each passed by the filter (safeguards.guard).
        """
        guard = self.safeguards
        if guard is None or guard.moderator is None:
            yield from self._stream(prompt, settings, use_adapter, eog_ids)
            return
        from lora_alpaca.safeguards.guard import moderated_stream

        if guard.check(prompt, "prompt"):
            yield guard.refusal, self._refused()
            return
        pieces = self._stream(prompt, settings, use_adapter, eog_ids)
        yield from moderated_stream(pieces, guard, self._refused)

    def _stream(
        self,
        prompt: str,
        settings: DecodingSettings,
        use_adapter: bool = True,
        eog_ids: Sequence[int] = (),
    ) -> Iterator[tuple[str, GenerationResult | None]]:
        settings.validate()
        if settings.mode == "beam":
            result = self._generate([prompt], settings, use_adapter, eog_ids)[0]
            yield result.text, result
            return
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = self.within_context(settings, self.prompt_tokens(prompt))
        eos = with_eog(self.eos_ids, eog_ids)
        config = self._config(settings, eos)
        cancel = _Cancelled()
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        holder: dict = {}

        def work() -> None:
            try:
                with torch.inference_mode(), self._adapter_context(use_adapter):
                    holder["out"] = self.model.generate(
                        **enc,
                        generation_config=config,
                        tokenizer=self.tokenizer,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([cancel]),
                        logits_processor=self._processors(),
                    )
            except BaseException as e:  # re-raised in the caller's thread below
                holder["error"] = e
                streamer.end()

        with self.lock:
            enc = self._encode([prompt])
            torch.manual_seed(settings.seed)
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            text, shown = "", ""
            try:
                for piece in streamer:
                    text += piece
                    visible = safe_stream_prefix(text, self.stop_strings).lstrip()
                    if visible != shown:
                        shown = visible
                        yield shown, None
            finally:
                # A closed stream (browser tab gone) stops the model at its next token
                # instead of holding the lock until max_new_tokens.
                cancel.event.set()
                worker.join()
        if "error" in holder:
            raise holder["error"]
        row = holder["out"][0, enc["input_ids"].shape[1] :].tolist()
        result = finish(row, self.tokenizer, eos, self.stop_strings)
        yield result.text, result
