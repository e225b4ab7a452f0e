"""`generate.py --api` safety: Bearer auth, no open port without a key, the bounded queue
(429), request timeouts (504); and one end-to-end answer from the real SmolLM2."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
from api_server import ApiServer, free_port
from conftest import run_script

KEY = "s3cret-key"
BODY = {
    "model": "base",
    "messages": [{"role": "user", "content": "Give three tips."}],
    "temperature": 0,
}


@pytest.fixture(scope="module")
def guarded(tiny_model):
    srv = ApiServer(
        "--base_model",
        tiny_model,
        "--dtype",
        "fp32",
        "--api_key",
        KEY,
        "--api_max_batch",
        "1",
        "--api_max_n",
        "1",
        "--api_queue_size",
        "1",
        "--api_timeout_s",
        "3",
        "--max_new_tokens_limit",
        "5000",
    )
    yield srv
    srv.stop()


def test_auth_required_when_key_set(guarded):
    ok = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list().data] == ["base"]
    assert ok.chat.completions.create(max_tokens=2, **BODY).choices[0].message.content is not None
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(guarded.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200  # liveness stays open


def test_full_queue_is_429_and_slow_requests_time_out(guarded):
    """Batch 1 + queue 1: of 5 long requests sent at once, one runs, one waits, the others
    are refused with 429; the 3 s timeout ends the accepted ones with 504."""
    long_body = {**BODY, "max_tokens": 5000}

    def post(_):
        return httpx.post(
            guarded.url + "/v1/chat/completions",
            json=long_body,
            timeout=60,
            headers={"Authorization": f"Bearer {KEY}"},
        )

    with cf.ThreadPoolExecutor(5) as ex:
        codes = sorted(r.status_code for r in ex.map(post, range(5)))
    assert codes.count(429) >= 3 and set(codes) <= {429, 504}, codes
    assert 504 in codes


def test_refuses_to_bind_beyond_loopback_without_key(tiny_model):
    r = run_script(
        "generate.py",
        "--api",
        "--base_model",
        tiny_model,
        "--server_name",
        "0.0.0.0",
        "--server_port",
        str(free_port()),
        env={"LORA_ALPACA_API_KEY": ""},
        timeout=120,
    )
    assert r.returncode == 2
    assert "--api_key" in r.stderr and "Traceback" not in r.stderr
    assert "loading" not in r.stderr  # refused before the model load


def test_model_ids_must_be_unique_and_not_base(tmp_path):
    from lora_alpaca.errors import UsageError
    from lora_alpaca.serve.models import model_ids_for

    assert model_ids_for([str(tmp_path / "a"), str(tmp_path / "b")]) == ["a", "b"]
    with pytest.raises(UsageError, match="two adapters named 'a'"):
        model_ids_for([str(tmp_path / "a"), str(tmp_path / "x" / "a")])
    with pytest.raises(UsageError, match="'base'"):
        model_ids_for([str(tmp_path / "base")])


def test_smollm2_answers_end_to_end(smollm2):
    srv = ApiServer("--base_model", smollm2)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model="base",
            max_tokens=24,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
        # several turns go through SmolLM2's own chat template
        turns = [
            {"role": "user", "content": "Hi, I am Ann."},
            {"role": "assistant", "content": "Hello Ann!"},
            {"role": "user", "content": "What is my name?"},
        ]
        r = c.chat.completions.create(model="base", max_tokens=8, temperature=0, messages=turns)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2)
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(tok(text)["input_ids"])
        assert r.choices[0].message.content
        s = c.completions.create(
            model="base",
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
        )
        assert "Paris" in "".join(ch.choices[0].text for ch in s)
    finally:
        srv.stop()
