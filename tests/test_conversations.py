"""Conversations at token level: exact per-turn masks under real chat templates (SmolLM2's,
a Mistral-style one without a system role, a Qwen/ChatML one), the alpaca form equal to
the Alpaca encoder, packing keeping rows apart, and one-line errors by row and turn."""

from __future__ import annotations

import json

import pytest
from conftest import finetune
from transformers import AutoTokenizer

from lora_alpaca.chat_template import IGNORE_INDEX, ChatRenderer, build_renderer
from lora_alpaca.data.packing import pack_rows
from lora_alpaca.data.tokenize import bos_prefix, tokenize_example
from lora_alpaca.prompts import load_template

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
THREE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Give three tips for staying healthy."},
    {"role": "assistant", "content": "Eat a balanced diet, exercise regularly and sleep well."},
    {"role": "user", "content": "Translate the sentence into French."},
    {"role": "assistant", "content": "Ci-dessous se trouve une instruction."},
]
SYSTEM = [
    {"role": "system", "content": "Write a response that appropriately completes the request."}
]


def learned_spans(ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def check_masks(renderer: ChatRenderer, messages, end_of_turn: str):
    tok = renderer.tokenizer
    ids, labels = renderer.encode(messages)
    want = tok.apply_chat_template(messages, chat_template=renderer.jinja_source, tokenize=False)
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    spans = learned_spans(ids, labels)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [a + end_of_turn for a in answers]
    # --train_on_turns last: only the final answer; --train_on_inputs: everything
    _, last = renderer.encode(messages, train_on_turns="last")
    assert [tok.decode(s) for s in learned_spans(ids, last)] == [answers[-1] + end_of_turn]
    assert renderer.encode(messages, train_on_inputs=True)[1] == ids


@pytest.mark.parametrize("system", [False, True])
def test_smollm2_three_turns(smollm2, system):
    tok = AutoTokenizer.from_pretrained(smollm2)
    r = build_renderer(tok, "base", load_template("alpaca"))
    assert r.eog_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    check_masks(r, (SYSTEM if system else []) + THREE, "<|im_end|>")


@pytest.fixture
def tiny_tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_mistral_style_template_no_system(tiny_tok):
    tiny_tok.chat_template = MISTRAL
    r = build_renderer(tiny_tok, "base", load_template("alpaca"))
    assert r.eog_token_ids == [tiny_tok.eos_token_id]
    check_masks(r, THREE, "</s>")
    with pytest.raises(ValueError, match="roles must alternate"):
        r.render(SYSTEM + THREE)


@pytest.mark.parametrize("system", [False, True])
def test_chatml_qwen_style_template(tiny_tok, system):
    tiny_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tiny_tok.eos_token = "<|endoftext|>"
    tiny_tok.chat_template = CHATML
    r = build_renderer(tiny_tok, "base", load_template("alpaca"))
    # EOS and the template's own end-of-turn token both end generation
    assert r.eog_token_ids == [tiny_tok.eos_token_id, tiny_tok.convert_tokens_to_ids("<|im_end|>")]
    check_masks(r, (SYSTEM if system else []) + THREE, "<|im_end|>")


@pytest.mark.parametrize("name", ["alpaca", "alpaca_short", "vigogne"])
def test_alpaca_form_single_turn_is_the_alpaca_example(tiny_tok, name):
    """The alpaca chat template renders one [user] turn to exactly the Alpaca prompt, and
    one exchange to exactly the ids and labels the Alpaca encoder trains on (BOS included)."""
    template = load_template(name)
    r = build_renderer(tiny_tok, "alpaca", template)
    user = "Give three tips for staying healthy."
    answer = "Eat a balanced diet."
    bos = tiny_tok.decode(bos_prefix(tiny_tok))
    assert r.render([{"role": "user", "content": user}]) == bos + template.build_prompt(user)
    ex = tokenize_example(user, "", answer, tiny_tok, template)
    ids, labels = r.encode(
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    )
    assert (ids, labels) == (ex["input_ids"], ex["labels"])
    check_masks(r, THREE, "</s>")
    check_masks(r, SYSTEM + THREE, "</s>")
    assert r.render(SYSTEM + THREE[:1]).startswith(bos + SYSTEM[0]["content"] + "\n\n")


def test_packing_keeps_conversations_apart(tiny_tok):
    r = build_renderer(tiny_tok, "alpaca", load_template("alpaca"))
    a, b = r.encode(THREE[:2]), r.encode(THREE[2:])
    packed = pack_rows([{"input_ids": a[0], "labels": a[1]}, {"input_ids": b[0], "labels": b[1]}])
    pos = packed["position_ids"][0].tolist()
    assert pos == list(range(len(a[0]))) + list(range(len(b[0])))  # row boundary restarts
    labels = packed["labels"][0].tolist()
    assert labels[len(a[0])] == IGNORE_INDEX  # row 2's first token is not predicted from row 1
    assert labels[: len(a[0])][1:] == a[1][1:] and labels[len(a[0]) + 1 :] == b[1][1:]


def test_bad_conversations_one_line_with_row_and_turn(tiny_model, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = finetune(
        "--base_model", tiny_model, "--data", data, "--output_dir", out, "--audit_only", "true",
        in_process=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    for want in (
        "5 problems",
        "line 1 turn 2: unknown role 'bot'; allowed: system, user, assistant",
        "line 2 turn 1: empty user content",
        "line 3 turn 2: two user turns in a row",
        "line 4 turn 3: the conversation ends without an assistant turn",
        "line 5 turn 1: 'content' is int, expected a string",
    ):
        assert want in line, line
    assert not out.exists()


def test_audit_role_split_counts_template_text_by_token_ids(smollm2, tiny_tok):
    """The audit's tokens by role: message content counts for its role; what the template
    writes (SmolLM2's injected default system prompt, headers, end-of-turn) as "template"."""
    from lora_alpaca.data.conversations import _role_tokens

    tok = AutoTokenizer.from_pretrained(smollm2)
    r = build_renderer(tok, "base", load_template("alpaca"))
    injected = "You are a helpful AI assistant named SmolLM"
    assert injected in r.render(THREE)  # no system turn given: the template writes one
    for msgs in (THREE, SYSTEM + THREE):
        ids, labels = r.encode(msgs)
        stats: dict = {}
        _role_tokens(r, msgs, ids, labels, stats)

        def content_ids(role, msgs=msgs):
            return sum(len(tok(m["content"])["input_ids"]) for m in msgs if m["role"] == role)

        n_answers = sum(m["role"] == "assistant" for m in msgs)
        assert stats["user"] == [content_ids("user"), 0], stats
        assert stats["assistant"] == [content_ids("assistant")] * 2, stats
        assert stats.get("system", [0, 0]) == [content_ids("system"), 0], stats
        # The rest is the template's, and its learned ids are the answers' <|im_end|>.
        assert sum(v[0] for v in stats.values()) == len(ids)
        assert stats["template"][1] == n_answers
    # Without a system turn the injected prompt is template text: more template ids.
    plain, with_system = {}, {}
    _role_tokens(r, THREE, *r.encode(THREE), plain)
    _role_tokens(r, SYSTEM + THREE, *r.encode(SYSTEM + THREE), with_system)
    injected_ids = len(tok(injected)["input_ids"])
    assert plain["template"][0] - with_system["template"][0] >= injected_ids
    # A template without a system role (Mistral-style, BOS and [INST] headers): same rule.
    tiny_tok.chat_template = MISTRAL
    m = build_renderer(tiny_tok, "base", load_template("alpaca"))
    stats = {}
    _role_tokens(m, THREE, *m.encode(THREE), stats)
    assert set(stats) == {"template", "user", "assistant"}
    assert stats["assistant"][1] == stats["assistant"][0] > 0
