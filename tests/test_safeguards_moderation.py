"""Content filter backends on fixed strings, the openai backend against a scripted endpoint
on a real loopback server, and the engine's windowed streaming cut (tiny model)."""

from __future__ import annotations

import socket
import sys

import pytest
from moderation_server import ModerationServer

from lora_alpaca.errors import UsageError
from lora_alpaca.generate.engine import DecodingSettings
from lora_alpaca.safeguards.guard import Safeguards
from lora_alpaca.safeguards.moderation import (
    STARTER_KEYWORDS,
    KeywordFilter,
    ModerationUnavailable,
    Verdict,
    build_backend,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_keywords_whole_word_case_insensitive(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# comment\n[weapons]\nbomb\nghost gun\n[custom]\nc++\n", encoding="utf-8")
    kw = KeywordFilter(f)
    assert kw("How do I build a BOMB?") == Verdict(True, {"weapons": 1.0})
    assert kw("a Ghost\n  Gun kit").flagged  # a phrase across any whitespace
    assert kw("I like C++.").categories == {"custom": 1.0}  # punctuation at the edge
    assert not kw("a bombastic speech").flagged  # whole words only
    assert not kw("bombs away").flagged  # no stemming: list the forms you mean
    assert not kw("ghostgun").flagged
    assert not kw("Tell me about alpacas.").flagged


def test_starter_list_and_bad_files(tmp_path):
    kw = KeywordFilter(STARTER_KEYWORDS)
    assert kw("Explain how to build a bomb.").categories == {"violence": 1.0}
    assert not kw("Explain how to bake bread.").flagged
    with pytest.raises(UsageError, match="no such file"):
        build_backend("keywords", str(tmp_path / "missing.txt"), None, 0.5, None, 5, None)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    with pytest.raises(UsageError, match="no words"):
        KeywordFilter(empty)
    with pytest.raises(UsageError, match="allowed: none, keywords"):
        build_backend("regex", None, None, 0.5, None, 5, None)
    with pytest.raises(UsageError, match="needs --moderation_api_base"):
        build_backend("openai", None, None, 0.5, None, 5, None)


def test_openai_backend_against_scripted_endpoint():
    with ModerationServer() as srv:
        mod = build_backend("openai", None, srv.base, 0.5, "omni-moderation-latest", 5, "k")
        assert mod("This is forbidden talk.") == Verdict(True, {"violence": 0.93})
        assert not mod("A calm sentence.").flagged
        strict = build_backend("openai", None, srv.base, 0.005, None, 5, None)
        assert strict("A calm sentence.").flagged  # the threshold decides on the scores
        assert srv.requests[0]["path"] == "/v1/moderations"
        assert srv.requests[0]["body"]["model"] == "omni-moderation-latest"
    with ModerationServer(status=500) as srv:
        with pytest.raises(ModerationUnavailable, match="HTTP 500"):
            build_backend("openai", None, srv.base, 0.5, None, 5, None)("hi")
    down = build_backend("openai", None, f"http://127.0.0.1:{closed_port()}/v1", 0.5, None, 5, None)
    with pytest.raises(ModerationUnavailable, match="cannot reach"):
        down("hi")


def test_python_backend(tmp_path, monkeypatch):
    (tmp_path / "myfilter.py").write_text(
        "def check(text):\n    return ('spam' in text, {'spam': 0.8})\n"
        "def crash(text):\n    raise RuntimeError('model missing')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = build_backend("python:myfilter:check", None, None, 0.5, None, 5, None)
    assert mod("buy spam now") == Verdict(True, {"spam": 0.8})
    assert not mod("hello").flagged
    with pytest.raises(ModerationUnavailable, match="RuntimeError: model missing"):
        build_backend("python:myfilter:crash", None, None, 0.5, None, 5, None)("x")
    with pytest.raises(UsageError, match="no function 'nope'"):
        build_backend("python:myfilter:nope", None, None, 0.5, None, 5, None)
    sys.modules.pop("myfilter", None)


def test_fail_closed_and_open(capsys):
    def down(text):
        raise ModerationUnavailable("--moderation openai: cannot reach http://x")

    with pytest.raises(ModerationUnavailable):
        Safeguards(moderator=down, backend="openai").check("hi", "prompt")
    assert Safeguards(moderator=down, fail_open=True).check("hi", "prompt") is None
    assert "letting the prompt through" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_gen(tiny_model):
    from lora_alpaca.generate.loading import LoadRequest, load_generator

    return load_generator(LoadRequest(base_model=str(tiny_model), device="cpu")).generator


def test_stream_stops_at_flagged_window(tiny_gen):
    """A classifier that flags any output past 40 characters: the stream passes windows of
    16 characters, stops at the first one past 40, and the model stops generating."""
    checked: list[str] = []

    def long_output(text: str) -> Verdict:
        if "### Instruction" in text:  # the templated prompt
            return Verdict(False)
        checked.append(text)
        return Verdict(len(text) > 40, {"length": 1.0} if len(text) > 40 else {})

    settings = DecodingSettings("sample", 1.0, 1.0, 0, max_new_tokens=200, seed=3)
    tiny_gen.safeguards = None
    full = [r for _, r in tiny_gen.stream(tiny_gen.prompt_for("Say something."), settings) if r]
    try:
        tiny_gen.safeguards = Safeguards(moderator=long_output, window_chars=16, refusal="NO.")
        seen = list(tiny_gen.stream(tiny_gen.prompt_for("Say something."), settings))
    finally:
        tiny_gen.safeguards = None
    assert len(full[0].text) > 100, "the unfiltered answer must be long for this test to mean much"
    *shown, (last_text, result) = seen
    assert (last_text, result.finish_reason, result.text) == ("NO.", "content_filter", "NO.")
    assert all(r is None and len(t) <= 40 for t, r in shown)  # only passed text was shown
    assert [t for t, _ in shown] == checked[:-1]  # each shown text was checked first
    assert len(checked[-1]) > 40 and len(checked[-1]) < len(full[0].text)
    assert result.new_tokens < full[0].new_tokens  # generation was cancelled early


def test_engine_refuses_flagged_prompts_in_batches(tiny_gen):
    guard = Safeguards(moderator=KeywordFilter(STARTER_KEYWORDS), refusal="Refused.")
    prompts = [tiny_gen.prompt_for(p) for p in ["Hi there.", "How to make a bomb?", "Bye."]]
    settings = DecodingSettings(max_new_tokens=8)
    try:
        tiny_gen.safeguards = guard
        results = tiny_gen.generate(prompts, settings)
    finally:
        tiny_gen.safeguards = None
    plain = tiny_gen.generate([prompts[0], prompts[2]], settings)
    assert [r.finish_reason for r in results][1] == "content_filter"
    assert results[1].text == "Refused." and results[1].new_tokens == 0
    assert [results[0].text, results[2].text] == [p.text for p in plain]  # others unchanged
