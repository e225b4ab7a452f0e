"""Judge backends: any OpenAI-compatible endpoint, or a local model read directly.

Each returns a `Verdict`: the probability that answer (B) is better, how it was read
(`logprobs` or `text`; `None` preference when the reply names neither label) and the
tokens used. Judgements are cached on disk (one JSON line per prompt, keyed by judge and
prompt), so a rerun costs nothing and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.evaluate.judge_prompt import (
    LABELS,
    label_of_token,
    preference_from_text,
    preference_from_top_logprobs,
)


@dataclass
class Verdict:
    p_b: float | None  # P(answer B is better); None: unreadable reply
    method: str  # "logprobs", "text" or "unparsed"
    reply: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ApiJudge:
    def __init__(self, api_base: str, model: str, api_key_env: str):
        import openai

        self.openai = openai
        self.api_base = api_base
        self.name = model
        self.client = openai.OpenAI(
            base_url=api_base, api_key=os.environ.get(api_key_env) or "none", max_retries=2
        )
        self.logprobs = True  # turned off for good if the endpoint rejects the request

    def _create(self, messages: list[dict]):
        kwargs = dict(model=self.name, messages=messages, max_tokens=8, temperature=0)
        if self.logprobs:
            try:
                return self.client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=5)
            except self.openai.BadRequestError:
                self.logprobs = False
        return self.client.chat.completions.create(**kwargs)

    def judge(self, messages: list[dict]) -> Verdict:
        try:
            resp = self._create(messages)
        except self.openai.APIConnectionError:
            raise UsageError(f"--api_base {self.api_base}: cannot connect to the judge") from None
        except self.openai.APIStatusError as e:
            raise UsageError(
                f"--api_base {self.api_base}: judge {self.name!r} answered HTTP {e.status_code}"
            ) from None
        choice = resp.choices[0]
        reply = choice.message.content or ""
        usage = resp.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            # The first token that is a label carries the verdict (a reply may open with
            # "(" or "**"); its alternatives give the probability-weighted preference.
            for tok in content:
                if label_of_token(tok.token) is None:
                    continue
                top = [(t.token, t.logprob) for t in (tok.top_logprobs or [])]
                p_b = preference_from_top_logprobs(top or [(tok.token, tok.logprob)])
                if p_b is not None:
                    return Verdict(p_b, "logprobs", reply, *tokens)
                break
        p_b = preference_from_text(reply)
        return Verdict(p_b, "text" if p_b is not None else "unparsed", reply, *tokens)


class LocalJudge:
    """A local model's next-token probabilities of the two labels after the prompt (its
    chat template when it has one): the logprob method without a server."""

    def __init__(self, base_model: str):
        import torch

        from lora_alpaca.generate.loading import LoadRequest, load_generator

        self.torch = torch
        gen = load_generator(LoadRequest(base_model=base_model)).generator
        self.model, self.tokenizer, self.device = gen.model, gen.tokenizer, gen.device
        self.name = f"local:{Path(base_model).name}"
        self.label_ids = [self.tokenizer.encode(x, add_special_tokens=False)[0] for x in LABELS]

    def judge(self, messages: list[dict]) -> Verdict:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer: ("
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = self.torch.softmax(logits, -1)[self.label_ids].tolist()
        p_b = probs[1] / (probs[0] + probs[1])
        reply = LABELS[int(probs[1] > probs[0])]
        return Verdict(p_b, "logprobs", reply, ids.shape[1], 1)


class JudgeCache:
    """Append-only JSONL; a torn last line from a killed run is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge_name: str, messages: list[dict]) -> str:
        blob = json.dumps([judge_name, messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        e = self.entries.get(key)
        return Verdict(**e["verdict"]) if e else None

    def put(self, key: str, verdict: Verdict) -> None:
        entry = {"key": key, "verdict": asdict(verdict)}
        self.entries[key] = entry
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
