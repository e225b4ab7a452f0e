"""Validated requests -> rows for the batcher, and engine events -> OpenAI response bodies."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from lora_alpaca.serve.engine import Delta, Final, RowSpec, TokenLogprob
from lora_alpaca.serve.errors import ApiError
from lora_alpaca.serve.render import render_chat
from lora_alpaca.serve.schemas import ChatRequest, CompletionRequest

FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


@dataclass
class Limits:
    max_n: int
    max_prompt_chars: int
    max_tokens_limit: int  # --max_new_tokens_limit
    default_max_tokens: int  # --max_new_tokens


@dataclass
class Plan:
    """One request as the batcher needs it: one RowSpec per choice, and how to answer."""

    kind: str  # "chat" or "completion"
    model_id: str
    specs: list[RowSpec]
    prompt_tokens: int  # summed over the distinct prompts (n copies count once)
    top_logprobs: int | None
    stream: bool
    include_usage: bool


def _entry(served, model_id: str):
    if model_id not in served.entries:
        raise ApiError(
            404,
            f"model {model_id!r} not found; this server has: {', '.join(served.entries)}",
            "model",
            code="model_not_found",
        )
    return served.entries[model_id]


def plan_request(served, req: ChatRequest | CompletionRequest, limits: Limits) -> Plan:
    entry = _entry(served, req.model)
    n = req.n or 1
    if isinstance(req, ChatRequest):
        kind = "chat"
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompts = [render_chat(served, entry, messages)]
        chars = sum(len(m["content"]) for m in messages)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        prompt_param = "messages"
    else:
        kind = "completion"
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ApiError(400, "prompt: empty list", "prompt")
        if req.echo:
            raise ApiError(400, "echo: not supported by this server (use echo: false)", "echo")
        chars = max(len(p) for p in prompts)
        top = req.logprobs
        max_tokens, param, prompt_param = req.max_tokens, "max_tokens", "prompt"
    if n * len(prompts) > limits.max_n:
        raise ApiError(
            400,
            f"n: {n} choice(s) x {len(prompts)} prompt(s) is over this server's cap of "
            f"{limits.max_n} (--api_max_n)",
            "n",
        )
    if chars > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"{prompt_param}: {chars} characters is over this server's cap of "
            f"{limits.max_prompt_chars} (--api_max_prompt_chars)",
            prompt_param,
        )
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise ApiError(
            400,
            f"{param}: {max_tokens} is over this server's cap of {limits.max_tokens_limit} "
            "(--max_new_tokens_limit)",
            param,
        )
    wanted = max_tokens or min(limits.default_max_tokens, limits.max_tokens_limit)
    stop = tuple(entry.template.stop_strings) + tuple(req.stop_list())
    if len(req.stop_list()) > 4:
        raise ApiError(400, "stop: at most 4 sequences", "stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    specs, prompt_tokens = [], 0
    for prompt in prompts:
        ids = tuple(served.tokenizer(prompt)["input_ids"])
        room = served.context_len - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"{prompt_param}: {len(ids)} tokens leave no room in the model's context of "
                f"{served.context_len} tokens",
                prompt_param,
                code="context_length_exceeded",
            )
        prompt_tokens += len(ids)
        for j in range(n):
            specs.append(
                RowSpec(
                    prompt_ids=ids,
                    max_new_tokens=min(wanted, room),  # never beyond the model's context
                    temperature=temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    # n choices with one seed differ from each other, and repeat as a set
                    seed=None if req.seed is None else req.seed + j,
                    stop=stop,
                    top_logprobs=top,
                    strip_leading=kind == "chat",
                )
            )
    return Plan(
        kind,
        req.model,
        specs,
        prompt_tokens,
        top,
        bool(req.stream),
        bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def chat_logprobs(items: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict:
    def one(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**one(t.token, t.logprob), "top_logprobs": [one(s, v) for s, v in t.top]}
            for t in items
        ]
    }


def completion_logprobs(items, offset: int = 0) -> dict:
    offsets, pos = [], offset
    for t in items:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }


def usage(plan: Plan, finals: list[Final]) -> dict:
    done = sum(f.completion_tokens for f in finals)
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": plan.prompt_tokens + done,
    }


def full_response(plan: Plan, rid: str, logprobs: list[list[TokenLogprob]], finals: list[Final]):
    created = int(time.time())
    choices = []
    for i, (f, lps) in enumerate(zip(finals, logprobs, strict=True)):
        reason = FINISH[f.finish_reason]
        if plan.kind == "chat":
            lp = chat_logprobs(lps) if plan.top_logprobs is not None else None
            message = {"role": "assistant", "content": f.text}
            choices.append(
                {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
            )
        else:
            lp = completion_logprobs(lps) if plan.top_logprobs is not None else None
            choices.append({"index": i, "text": f.text, "logprobs": lp, "finish_reason": reason})
    return {
        "id": rid,
        "object": "chat.completion" if plan.kind == "chat" else "text_completion",
        "created": created,
        "model": plan.model_id,
        "choices": choices,
        "usage": usage(plan, finals),
    }


def chunk(
    plan: Plan,
    rid: str,
    created: int,
    index: int,
    delta: Delta | None,
    reason=None,
    offset: int = 0,
    first: bool = False,
) -> dict:
    """One SSE chunk for choice `index` (delta text + its logprobs, or the finish reason)."""
    text = delta.text if delta else ""
    lps = delta.logprobs if delta else ()
    if plan.kind == "chat":
        d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        lp = chat_logprobs(lps) if plan.top_logprobs is not None and lps else None
        choice = {"index": index, "delta": d, "logprobs": lp, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        lp = completion_logprobs(lps, offset) if plan.top_logprobs is not None and lps else None
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
        obj = "text_completion"
    body = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": plan.model_id,
        "choices": [choice],
    }
    if plan.include_usage:
        body["usage"] = None
    return body
