"""The FastAPI app and `serve(cfg)`, which `generate.py --api` runs."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_alpaca.serve.batcher import Batcher, Job, QueueFull, run_rows
from lora_alpaca.serve.engine import Delta, Failed, Final, Row
from lora_alpaca.serve.errors import ApiError, from_validation
from lora_alpaca.serve.handlers import Limits, Plan, chunk, full_response, new_id, plan_request
from lora_alpaca.serve.schemas import ChatRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25


def build_app(
    served,
    batcher: Batcher,
    limits: Limits,
    api_key: str | None,
    max_body: int,
    timeout_s: float,
    guard=None,  # lora_alpaca.safeguards.guard.Safeguards (--moderation / --watermark)
) -> FastAPI:
    from lora_alpaca.safeguards import api as safeguards

    app = FastAPI(title="lora-alpaca OpenAI-compatible API", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc):
        return ApiError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

    def check_auth(request: Request) -> None:
        # A plain check per /v1 route, not an HTTP middleware: starlette's BaseHTTPMiddleware
        # wraps streaming responses and would blur client-disconnect handling.
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": list(served.entries),
            "waiting": batcher.waiting,
            "batches_run": batcher.batches_run,
            "largest_batch": batcher.largest_batch,
            "finished": batcher.finished,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": started, "owned_by": "lora-alpaca"}
                for i in served.entries
            ],
        }

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ApiError(
                413, f"body: over this server's cap of {max_body} bytes (--api_max_body_bytes)"
            )
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > max_body:
                raise ApiError(
                    413, f"body: over this server's cap of {max_body} bytes (--api_max_body_bytes)"
                )
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body: expected a JSON object")
        return data

    async def answer(request: Request, schema):
        check_auth(request)
        try:
            req = schema.model_validate(await read_json(request))
        except ValidationError as e:
            raise from_validation(e) from None
        plan = plan_request(served, req, limits)
        if safeguards.check(guard, safeguards.request_text(req), "prompt"):
            finals = [safeguards.refused(guard) for _ in plan.specs]
            if plan.stream:
                return StreamingResponse(
                    stream(request, plan, [Row(s, None) for s in plan.specs], None, finals),
                    media_type="text/event-stream",
                )
            return full_response(plan, new_id(plan.kind), [[] for _ in finals], finals)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + timeout_s

        def emitter(i: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))

        rows = [Row(s, emitter(i), deadline=deadline) for i, s in enumerate(plan.specs)]
        try:
            batcher.submit(Job(plan.model_id, rows))
        except QueueFull:
            raise ApiError(
                429,
                f"server busy: {batcher.queue_size} requests already waiting; retry later",
                type="rate_limit_error",
                code="queue_full",
            ) from None
        if plan.stream:
            return StreamingResponse(
                stream(request, plan, rows, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await collect(request, plan, rows, events)

    async def collect(request: Request, plan: Plan, rows: list[Row], events: asyncio.Queue):
        finals: list[Final | None] = [None] * len(rows)
        logprobs: list[list] = [[] for _ in rows]
        try:
            while any(f is None for f in finals):
                try:
                    i, ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody is listening
                    continue
                if isinstance(ev, Failed):
                    raise ApiError(500, ev.message, type="server_error")
                if isinstance(ev, Delta):
                    logprobs[i].extend(ev.logprobs)
                elif isinstance(ev, Final):
                    logprobs[i].extend(ev.rest.logprobs)
                    if ev.finish_reason == "timeout":
                        raise ApiError(
                            504,
                            f"request timed out after {timeout_s:g} s (--api_timeout_s)",
                            type="timeout",
                            code="timeout",
                        )
                    finals[i] = ev
        finally:
            for r in rows:  # client gone, timed out or failed: free its batch slots
                r.cancel.set()
        finals = [
            safeguards.refused(guard, f.completion_tokens)
            if safeguards.check(guard, f.text, "output")
            else f
            for f in finals
        ]
        return full_response(plan, new_id(plan.kind), logprobs, finals)

    async def stream(request: Request, plan: Plan, rows: list[Row], events, refusals=None):
        rid, created = new_id(plan.kind), int(time.time())
        finals: list[Final | None] = [None] * len(rows)
        windows = None
        if guard is not None and guard.moderator is not None:
            windows = [safeguards.StreamWindow(guard) for _ in rows]
        if refusals is not None:  # a flagged prompt: every choice is the refusal
            events = asyncio.Queue()
            for i, f in enumerate(refusals):
                events.put_nowait((i, f))
            windows = None
        offsets = [0] * len(rows)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if plan.kind == "chat":
                for i in range(len(rows)):
                    yield sse(chunk(plan, rid, created, i, None, first=True))
            checked = time.monotonic()
            while any(f is None for f in finals):
                # uvicorn drops writes to a closed socket silently, so a gone client is
                # noticed by asking, at most every DISCONNECT_POLL_S.
                if time.monotonic() - checked > DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    i, ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
                if isinstance(ev, Failed) or (
                    isinstance(ev, Final) and ev.finish_reason == "timeout"
                ):
                    msg = (
                        ev.message
                        if isinstance(ev, Failed)
                        else f"request timed out after {timeout_s:g} s"
                    )
                    yield sse(
                        {
                            "error": {
                                "message": msg,
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    break
                if windows is not None:  # only text the filter has passed goes out
                    try:
                        ev = windows[i].filter(ev)
                    except ApiError as e:  # filter unreachable mid-stream: fail closed
                        yield sse({"error": {"message": e.message, "type": "server_error",
                                             "param": None, "code": e.code}})  # fmt: skip
                        break
                    if ev is None:
                        continue
                    if isinstance(ev, Final) and ev.finish_reason == "content_filter":
                        rows[i].cancel.set()
                delta = ev if isinstance(ev, Delta) else ev.rest
                if delta.text or delta.logprobs:
                    yield sse(chunk(plan, rid, created, i, delta, offset=offsets[i]))
                    offsets[i] += len(delta.text)
                if isinstance(ev, Final):
                    finals[i] = ev
                    yield sse(chunk(plan, rid, created, i, None, reason=ev.finish_reason))
            else:
                if plan.include_usage:
                    from lora_alpaca.serve.handlers import usage

                    yield sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk"
                            if plan.kind == "chat"
                            else "text_completion",
                            "created": created,
                            "model": plan.model_id,
                            "choices": [],
                            "usage": usage(plan, finals),
                        }
                    )
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects too (starlette cancels this generator):
            # the engine drops these rows at its next token.
            for r in rows:
                r.cancel.set()

    safeguards.add_moderations_route(app, guard, check_auth)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, CompletionRequest)

    return app


def serve(cfg, api_key: str | None, guard=None) -> int:
    import uvicorn

    from lora_alpaca.serve.models import load_served

    served = load_served(cfg)
    batcher = Batcher(
        lambda model_id, rows: run_rows(served, model_id, rows),
        cfg.api_max_batch,
        cfg.api_queue_size,
        cfg.api_gather_ms / 1000,
    )
    limits = Limits(
        cfg.api_max_n, cfg.api_max_prompt_chars, cfg.max_new_tokens_limit, cfg.max_new_tokens
    )
    if guard is not None:
        served.watermark_processor = guard.watermark_processor(served.model, served.device)
    app = build_app(
        served, batcher, limits, api_key, cfg.api_max_body_bytes, cfg.api_timeout_s, guard
    )
    print(
        f"[generate] {served.description}; API on http://{cfg.server_name}:{cfg.server_port}/v1 "
        f"(models: {', '.join(served.entries)}; auth {'on' if api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=cfg.server_name,
        port=cfg.server_port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0
