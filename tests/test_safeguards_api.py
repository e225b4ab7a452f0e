"""Both safeguards in `generate.py --api`, against live servers with real clients (openai,
httpx): flagged prompts and answers in OpenAI's shapes, streaming cut at the flagged window,
/v1/moderations through the configured backend, watermarked answers, and fail closed."""

from __future__ import annotations

import httpx
import pytest
from api_server import ApiServer
from test_safeguards_moderation import closed_port

from lora_alpaca.safeguards.detect import Detector
from lora_alpaca.safeguards.watermark import WatermarkSettings

pytestmark = pytest.mark.slow
KEY = 918273645564738291
REFUSAL = "[refused by the filter]"
FILTER = """
def check(text):
    low = text.lower()
    cats = {k: 1.0 for k in ("forbidden", "paris") if k in low}
    return (bool(cats), cats)
"""


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    mod = tmp_path_factory.mktemp("filter")
    (mod / "api_filter.py").write_text(FILTER)
    srv = ApiServer("--base_model", smollm2, "--watermark", "--watermark_key", KEY,
                    "--moderation", "python:api_filter:check", "--moderation_refusal", REFUSAL,
                    "--moderation_window", "12", "--max_new_tokens_limit", "120",
                    env={"PYTHONPATH": str(mod), "OMP_NUM_THREADS": "1"})  # fmt: skip
    yield srv
    srv.stop()


def client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_flagged_prompt_and_flagged_answer(server):
    c = client(server)
    r = c.chat.completions.create(
        model=c.models.list().data[0].id,
        messages=[{"role": "user", "content": "Tell me something forbidden."}],
        max_tokens=20,
    )
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == REFUSAL
    r = c.chat.completions.create(
        model=r.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=60,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == REFUSAL  # the answer named Paris: cut


def test_stream_is_cut_at_the_flagged_window(server):
    c = client(server)
    model = c.models.list().data[0].id
    pieces, reasons = [], []
    for ch in c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=120,
        temperature=0,
        stream=True,
    ):
        for choice in ch.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    text = "".join(pieces)
    assert reasons[-1] == "content_filter"
    assert "paris" not in text.lower() and text.endswith(REFUSAL)
    refused = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say forbidden things."}],
        stream=True,
    )
    chunks = [ch.choices[0] for ch in refused if ch.choices]
    assert "".join(c.delta.content or "" for c in chunks) == REFUSAL
    assert chunks[-1].finish_reason == "content_filter"


def test_moderations_endpoint_serves_the_backend(server):
    c = client(server)
    res = c.moderations.create(input=["a forbidden thing", "hello there"])
    assert [r.flagged for r in res.results] == [True, False]
    assert res.results[0].model_dump()["category_scores"]["forbidden"] == 1.0
    bad = httpx.post(server.url + "/v1/moderations", json={"input": 3}, timeout=10)
    assert bad.status_code == 400 and "input" in bad.json()["error"]["message"]


def test_api_answers_are_watermarked(server, smollm2):
    from transformers import AutoConfig, AutoTokenizer

    c = client(server)
    r = c.completions.create(
        model=c.models.list().data[0].id,
        prompt="Once upon a time, in a small village by the sea,",
        max_tokens=100,
        temperature=1.0,
        top_p=0.95,
        seed=3,
    )
    config, tok = AutoConfig.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
    det = Detector(config, tok, WatermarkSettings(KEY))
    wrong = Detector(config, tok, WatermarkSettings(KEY + 1))
    s = det.score(r.choices[0].text)
    assert s["prediction"] and s["z_score"] > 4, (s, r.choices[0].text)
    assert not wrong.score(r.choices[0].text)["prediction"]


def test_unreachable_filter_fails_closed(smollm2):
    srv = ApiServer("--base_model", smollm2, "--moderation", "openai", "--moderation_api_base",
                    f"http://127.0.0.1:{closed_port()}/v1", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": "base", "prompt": "Hi", "max_tokens": 5})  # fmt: skip
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()
    finally:
        srv.stop()
    assert r.status_code == 503, (r.status_code, r.text, models)
    assert "content filter unavailable" in r.json()["error"]["message"]
