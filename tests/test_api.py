"""`generate.py --api` against real clients (the `openai` package, raw httpx) on loopback:
schema, streaming, n, seed, logprobs, stop, errors, several adapters, concurrency."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
from adapters import make_adapter
from api_server import ApiServer
from conftest import run_script

Q = "Give three tips for staying healthy."
QUESTIONS = [
    Q,
    "What is the capital of France?",
    "Translate the sentence into French.",
    "Classify the sentiment of the review.",
]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-adapters")
    return {
        name: make_adapter(tiny_model, root / name, seed=seed)
        for name, seed in (("alpha", 1), ("beta", 2))
    }


@pytest.fixture(scope="module")
def server(adapters):
    srv = ApiServer(
        "--lora_weights",
        adapters["alpha"],
        "--lora_weights",
        adapters["beta"],
        "--dtype",
        "fp32",
        "--max_new_tokens_limit",
        "3000",
        "--api_max_n",
        "4",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, model, text, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kw
    )


def test_models_are_adapter_folders_and_base(client):
    assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]


def test_each_model_id_answers_like_generate_cli(client, adapters):
    answers = {m: chat(client, m, Q).choices[0].message.content for m in ("base", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers  # the adapter switch really happens
    for name in ("alpha", "beta"):
        r = run_script(
            "generate.py",
            "--lora_weights",
            adapters[name],
            "--prompt",
            Q,
            "--max_new_tokens",
            "12",
            "--dtype",
            "fp32",
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert answers[name].strip() == r.stdout.strip()


def test_chat_response_schema_and_usage(client):
    r = chat(client, "alpha", Q)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "alpha"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12 and r.usage.prompt_tokens > 10


def test_streaming_equals_non_streaming_with_usage_last(client):
    full = chat(client, "beta", Q, max_tokens=20).choices[0].message.content
    chunks = list(
        chat(client, "beta", Q, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_completions_stream_and_not(client):
    r = client.completions.create(model="alpha", prompt="The quick", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 8
    s = client.completions.create(
        model="alpha", prompt="The quick", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_sse_framing_raw(server):
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6
    assert all(p["usage"] is None for p in payloads[:-1])


def test_n_and_seed(client):
    kw = dict(max_tokens=10, temperature=1.0, n=3, seed=7)
    a = [c.message.content for c in chat(client, "alpha", Q, **kw).choices]
    b = [c.message.content for c in chat(client, "alpha", Q, **kw).choices]
    c = [c.message.content for c in chat(client, "alpha", Q, **{**kw, "seed": 8}).choices]
    assert a == b and len(set(a)) == 3 and a != c


def test_logprobs_are_the_model_scores(client, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.prompts import load_template

    r = chat(client, "base", Q, max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 3
    for item in content:  # greedy: the chosen token is the top alternative
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.logprob < 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = tok(load_template("alpaca").build_prompt(Q), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    best = int(lp.argmax())
    assert content[0].token == tok.decode([best])
    assert content[0].logprob == pytest.approx(float(lp[best]), abs=1e-4)
    comp = client.completions.create(
        model="base", prompt="The quick", max_tokens=2, temperature=0, logprobs=2
    )
    assert len(comp.choices[0].logprobs.tokens) == 2
    assert all(len(t) == 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_request_stop_string(client):
    full = chat(client, "alpha", Q, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    r = chat(client, "alpha", Q, max_tokens=12, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_multi_turn_chat_renders_through_the_adapters_training_renderer(
    client, adapters, tiny_model
):
    """Chat requests go through the one renderer (lora_alpaca.chat_template): an Alpaca-trained
    adapter answers a multi-turn conversation in the multi-turn form of its template, and a
    single turn is exactly its Alpaca prompt (the same prompt the sampler and CLI build)."""
    from transformers import AutoTokenizer

    from lora_alpaca.chat_template import renderer_from_manifest
    from lora_alpaca.prompts import load_template
    from lora_alpaca.runfolder import read_manifest

    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    r = client.chat.completions.create(model="alpha", messages=turns, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    renderer = renderer_from_manifest(read_manifest(adapters["alpha"]), tok)
    single = renderer.prompt_text([{"role": "user", "content": Q}])
    assert tok(single)["input_ids"] == tok(load_template("alpaca").build_prompt(Q))["input_ids"]
    assert r.usage.prompt_tokens == len(tok(renderer.prompt_text(turns))["input_ids"])


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"max_tokens": 3001}, "max_tokens"),
        ({"presence_penalty": 9}, "presence_penalty"),
        (
            {
                # two user turns in a row: the adapter's (alpaca) template cannot render them
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "c"},
                ]
            },
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "x" * 40000}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"stop": 5}, "stop"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, extra, param):
    body = {"model": "alpha", "messages": [{"role": "user", "content": Q}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_errors_through_openai_client(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "alpha", Q, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        chat(client, "gamma", Q)
    # unknown fields are ignored, as clients send many
    assert chat(client, "alpha", Q, extra_body={"frobnicate": 1, "top_k": 3}).choices
    r = httpx.post(server.url + "/v1/completions", content=b"{oops", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body")
    big = httpx.post(server.url + "/v1/completions", content=b"x" * 1_100_000, timeout=30)
    assert big.status_code == 413


def test_penalties_change_the_answer(client):
    plain = chat(client, "alpha", Q, max_tokens=12).choices[0].message.content
    pen = (
        chat(client, "alpha", Q, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
        .choices[0]
        .message.content
    )
    assert plain != pen


def test_concurrent_clients_get_their_own_answers_batched(client, server):
    jobs = [(m, q) for m in ("base", "alpha", "beta") for q in QUESTIONS]
    alone = {j: chat(client, *j).choices[0].message.content for j in jobs}
    before = server.health()["largest_batch"]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        together = dict(
            zip(
                jobs,
                ex.map(lambda j: chat(client, *j).choices[0].message.content, jobs),
                strict=True,
            )
        )
    assert together == alone
    assert server.health()["largest_batch"] > max(before, 1)  # they really shared batches


def test_client_disconnect_stops_its_generation(server):
    cancelled = server.health()["finished"].get("cancelled", 0)
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(8):  # a few tokens in: the row is mid-generation when we leave
            next(lines)
    deadline = time.monotonic() + 30
    while server.health()["finished"].get("cancelled", 0) == cancelled:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.2)
