"""The safeguards in `generate.py --api`: flagged requests and answers in OpenAI's shapes
(the refusal as the message, finish_reason "content_filter"), streamed answers checked
window by window before a byte is sent, and POST /v1/moderations through the configured
backend so one filter can protect several front ends."""

from __future__ import annotations

import secrets

from fastapi import Request  # module level: FastAPI resolves the string annotation here

from lora_alpaca.safeguards.guard import CONTENT_FILTER, Safeguards
from lora_alpaca.safeguards.moderation import ModerationUnavailable
from lora_alpaca.serve.engine import Delta, Final
from lora_alpaca.serve.errors import ApiError


def unavailable(e: ModerationUnavailable) -> ApiError:
    return ApiError(503, f"content filter unavailable, request refused: {e}",
                    type="server_error", code="moderation_unavailable")  # fmt: skip


def check(guard: Safeguards | None, text: str, what: str) -> bool:
    """True when flagged; an unreachable filter (not fail-open) becomes HTTP 503."""
    if guard is None or guard.moderator is None:
        return False
    try:
        return guard.check(text, what) is not None
    except ModerationUnavailable as e:
        raise unavailable(e) from None


def request_text(req) -> str:
    """What the user sent: every message's text, or the completion prompt(s)."""
    if hasattr(req, "messages"):
        return "\n".join(m.text() for m in req.messages)
    return req.prompt if isinstance(req.prompt, str) else "\n".join(req.prompt)


def refused(guard: Safeguards, tokens: int = 0) -> Final:
    return Final(CONTENT_FILTER, guard.refusal, tokens, Delta(guard.refusal, ()))


class StreamWindow:
    """Per choice: hold streamed deltas until `window_chars` more text is there, check the
    whole text so far, then release them; a flagged window ends the choice with the refusal
    (after a blank line when clean text was already sent)."""

    def __init__(self, guard: Safeguards):
        self.guard, self.text, self.held, self.lps = guard, "", "", []
        self.done = False

    def _cut(self, tokens: int) -> Final:
        self.done = True
        sep = "\n\n" if self.text else ""
        f = refused(self.guard, tokens)
        return Final(f.finish_reason, f.text, tokens, Delta(sep + self.guard.refusal, ()))

    def filter(self, ev):
        """The event to send instead of `ev`: None (held back, or choice already ended),
        a Delta of checked text, or a Final whose `rest` is what is left to send."""
        if self.done:
            return None  # e.g. the engine's "cancelled" after a cut
        if isinstance(ev, Delta):
            self.held += ev.text
            self.lps.extend(ev.logprobs)
            if len(self.held) < self.guard.window_chars:
                return None
            if check(self.guard, self.text + self.held, "output"):
                return self._cut(0)
            out = Delta(self.held, tuple(self.lps))
            self.text, self.held, self.lps = self.text + self.held, "", []
            return out
        self.held += ev.rest.text
        self.lps.extend(ev.rest.logprobs)
        if ev.finish_reason in ("stop", "length") and check(self.guard, ev.text, "output"):
            return self._cut(ev.completion_tokens)
        self.done = True
        return Final(ev.finish_reason, ev.text, ev.completion_tokens,
                     Delta(self.held, tuple(self.lps)))  # fmt: skip


def add_moderations_route(app, guard: Safeguards | None, check_auth) -> None:
    @app.post("/v1/moderations")
    async def moderations(request: Request):
        check_auth(request)
        if guard is None or guard.moderator is None:
            raise ApiError(404, "this server has no content filter (start it with --moderation)",
                           "model", code="moderation_off")  # fmt: skip
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body: not valid JSON") from None
        items = body.get("input") if isinstance(body, dict) else None
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise ApiError(400, "input: a string or a non-empty list of strings", "input")
        results = []
        for text in items:
            try:
                v = guard.moderate(text)
            except ModerationUnavailable as e:
                raise unavailable(e) from None
            results.append({
                "flagged": v.flagged,
                "categories": {k: True for k in v.categories},
                "category_scores": dict(v.categories),
            })  # fmt: skip
        return {"id": "modr-" + secrets.token_hex(12), "model": guard.backend, "results": results}
