"""Teachers: an OpenAI-compatible endpoint (chat or completions) or a local model.

The endpoint client is the `openai` package: it already retries 408/409/429/5xx and lost
connections with exponential backoff (honouring Retry-After), so `--max_retries` is passed
to it; what is added here is concurrency, ordered results, and one clear line for the
failures a user can fix (server down, wrong model, refused key).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lora_alpaca.errors import UsageError
from lora_alpaca.selfinstruct.prompt import STOP


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class EndpointTeacher:
    def __init__(self, cfg):
        import openai

        self.cfg = cfg
        self.description = f"{cfg.model} at {cfg.api_base} ({cfg.api})"
        # Local servers need no key; hosted ones answer 401, reported below.
        self.client = openai.OpenAI(
            base_url=cfg.api_base,
            api_key=os.environ.get("OPENAI_API_KEY") or "no-key",
            max_retries=cfg.max_retries,
            timeout=cfg.request_timeout,
        )

    def _one(self, prompt: str, seed: int) -> Answer:
        cfg = self.cfg
        args = dict(
            model=cfg.model,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            stop=STOP,
            seed=seed,
        )
        try:
            if cfg.api == "chat":
                r = self.client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}], **args
                )
                text, reason = r.choices[0].message.content or "", r.choices[0].finish_reason
            else:
                r = self.client.completions.create(prompt=prompt, **args)
                text, reason = r.choices[0].text or "", r.choices[0].finish_reason
        except Exception as e:
            raise self._explain(e) from None
        usage = r.usage
        return Answer(
            text,
            "length" if reason == "length" else "stop",
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
        )

    def _explain(self, e: Exception) -> Exception:
        import openai

        cfg = self.cfg
        where = f"--api_base {cfg.api_base}"
        retries = f" after {cfg.max_retries} retries" if cfg.max_retries else ""
        if isinstance(e, openai.APITimeoutError):
            return UsageError(
                f"{where}: no answer within --request_timeout {cfg.request_timeout}s{retries}"
            )
        if isinstance(e, openai.APIConnectionError):
            return UsageError(
                f"{where}: cannot reach the endpoint{retries} ({e}); is the server running?"
            )
        if isinstance(e, openai.APIStatusError):
            detail = " ".join(str(getattr(e, "message", e)).split())[:300]
            code = e.status_code
            if code in (401, 403):
                return UsageError(
                    f"{where}: the endpoint refused the key ({code}: {detail}); set OPENAI_API_KEY"
                )
            if code == 404:
                return UsageError(
                    f"--model {cfg.model}: {cfg.api_base} refuses it or has no /{cfg.api} route "
                    f"(404: {detail}); check the name and that the URL ends in /v1"
                )
            if code in (400, 422):
                return UsageError(
                    f"--model {cfg.model}: the endpoint refused the request ({code}: {detail})"
                )
            return UsageError(f"{where}: the endpoint keeps failing{retries} ({code}: {detail})")
        return e

    def answer(self, prompts: list[str], seeds: list[int]) -> list[Answer]:
        """Answers in the order of `prompts` (whatever order they arrive in)."""
        workers = min(self.cfg.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, prompts, seeds))


class LocalTeacher:
    """A model loaded in this process through lora_alpaca's generation engine."""

    def __init__(self, cfg):
        import dataclasses

        from lora_alpaca.generate.engine import DecodingSettings, TextGenerator
        from lora_alpaca.generate.loading import LoadRequest, load_generator

        self.cfg = cfg
        loaded = load_generator(LoadRequest(base_model=cfg.teacher_model))
        gen = loaded.generator
        # Stop at task 20, not at the Alpaca template's "### " headers (they separate tasks).
        template = dataclasses.replace(gen.template, stop_strings=tuple(STOP))
        self.generator = TextGenerator(gen.model, gen.tokenizer, template, gen.device)
        self.chat = cfg.api == "chat" and bool(getattr(gen.tokenizer, "chat_template", None))
        self.description = (
            f"{loaded.description} (local, {'chat template' if self.chat else 'raw prompt'})"
        )
        greedy = cfg.temperature == 0
        self.settings = lambda seed: DecodingSettings(
            mode="greedy" if greedy else "sample",
            temperature=cfg.temperature or 1.0,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_tokens,
            seed=seed,
        )

    def _text(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.generator.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def answer(self, prompts: list[str], seeds: list[int]) -> list[Answer]:
        texts = [self._text(p) for p in prompts]
        # One batch per round, seeded by the round's first request seed (repeatable).
        results = self.generator.generate(texts, self.settings(seeds[0] % 2**31))
        return [
            Answer(
                r.text,
                "length" if r.finish_reason == "length" else "stop",
                self.generator.prompt_tokens(t),
                r.new_tokens,
            )
            for t, r in zip(texts, results)
        ]


def make_teacher(cfg):
    return LocalTeacher(cfg) if cfg.teacher_model else EndpointTeacher(cfg)
