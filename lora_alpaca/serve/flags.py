"""The --api flags (a base class of GenerateConfig, so they share its --help and --config)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from lora_alpaca import cli
from lora_alpaca.errors import UsageError

F = cli.field
API_KEY_ENV = "LORA_ALPACA_API_KEY"


@dataclass
class ServeFlags:
    api: bool = F(
        False,
        "Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, "
        "/health) on --server_name:--server_port instead of the sampler page.",
    )
    api_key: str | None = F(
        None,
        f"API: clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); "
        "required when --server_name is beyond loopback.",
    )
    api_max_batch: int = F(8, "API: most rows (choices) decoded together in one batch.")
    api_queue_size: int = F(32, "API: requests that may wait for a batch; one more gets 429.")
    api_gather_ms: int = F(
        10, "API: how long the batcher waits for requests sent together (milliseconds)."
    )
    api_max_n: int = F(4, "API: most choices (n x prompts) one request may ask for.")
    api_max_prompt_chars: int = F(32000, "API: longest prompt / conversation, in characters.")
    api_max_body_bytes: int = F(1_000_000, "API: largest request body, in bytes (413 beyond).")
    api_timeout_s: float = F(
        300.0, "API: a request still unanswered after this many seconds ends with 504."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_flags(cfg) -> str | None:
    """Before the model load: caps make sense, and no open port without a key. Returns the key."""
    if cfg.prompt is not None or cfg.input_file:
        raise UsageError("--api serves requests over HTTP; give it without --prompt / --input_file")
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(cfg.server_name) and not key:
        raise UsageError(
            f"--server_name {cfg.server_name}: the API beyond loopback needs --api_key "
            f"(or ${API_KEY_ENV}); anyone on the network could use the model otherwise"
        )
    for flag in (
        "api_max_batch",
        "api_queue_size",
        "api_max_n",
        "api_max_prompt_chars",
        "api_max_body_bytes",
    ):
        if getattr(cfg, flag) < 1:
            raise UsageError(f"--{flag} {getattr(cfg, flag)}: must be >= 1")
    if cfg.api_gather_ms < 0:
        raise UsageError(f"--api_gather_ms {cfg.api_gather_ms}: must be >= 0")
    if not cfg.api_timeout_s > 0:
        raise UsageError(f"--api_timeout_s {cfg.api_timeout_s}: must be > 0")
    if cfg.api_max_n > cfg.api_max_batch:
        raise UsageError(
            f"--api_max_n {cfg.api_max_n}: must be <= --api_max_batch {cfg.api_max_batch} "
            "(a request's choices are decoded in one batch)"
        )
    if cfg.share:
        raise UsageError(
            "--share is for the sampler page; the API is never published on gradio.live"
        )
    return key
