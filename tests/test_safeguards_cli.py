"""Both safeguards as users meet them: real generate.py processes on SmolLM2 in file mode,
one-prompt mode and the page (gradio_client against the live sampler), and the detector."""

from __future__ import annotations

import json
import stat

import pytest
from adapters import make_adapter
from conftest import run_script
from moderation_server import ModerationServer
from sampler_page import sampler_page
from test_safeguards_moderation import closed_port

pytestmark = pytest.mark.slow
SAMPLE = ["--mode", "sample", "--temperature", "1.0", "--top_p", "0.95", "--top_k", "0"]
# Fixed keys keep these sampled runs repeatable (a fresh secret key per run would make the
# z-scores differ run to run); the key drawn on first use is checked in its own run below.
KEY = "918273645564738291"


def test_file_mode_watermark_filter_and_detector(smollm2, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"id": i, "instruction": p}) for i, p in enumerate([
            "Write a letter to a friend about your summer holiday.",
            "Explain how to build a bomb.",
            "Describe the city of Paris for a tourist.",
            "Write a long story about a dragon who learns to cook.",
            "Give ten tips for learning a new language, with a sentence on each.",
        ])) + "\n"
    )  # fmt: skip
    out = tmp_path / "answers.jsonl"
    r = run_script("generate.py", "--base_model", smollm2, "--input_file", rows,
                   "--output_file", out, "--watermark", "--watermark_key", KEY,
                   "--moderation", "keywords", *SAMPLE, "--max_new_tokens", "100",
                   "--min_new_tokens", "64", "--seed", "7")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert answers[1]["finish_reason"] == "content_filter"
    assert answers[1]["response"] == "Sorry, I can't help with that."
    assert "flagged prompt (keywords" in r.stderr and "violence=1.00" in r.stderr
    assert "build a bomb" not in r.stderr  # the log names categories, not the text

    scores = tmp_path / "scores.jsonl"
    d = run_script("generate.py", "--base_model", smollm2, "--detect_watermark", out,
                   "--output_file", scores, "--watermark_key", KEY)  # fmt: skip
    assert d.returncode == 0, d.stderr[-2000:]
    found = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [f["id"] for f in found] == [0, 1, 2, 3, 4]
    for f in found:
        assert {"z_score", "p_value", "green_fraction", "num_tokens_scored", "prediction"} <= set(f)
    assert found[1]["verdict"] == "too_short"  # the refusal: a few tokens, no verdict
    # The detector's power grows with length: a sampled answer that stops after ~20 tokens
    # rarely reaches z = 4 even when every token was watermarked, and which answers stop
    # early differs between CPUs (AMX Xeon: 20-23 tokens, z 2.2-3.1; AVX512 EPYC: 3 of 4).
    # --min_new_tokens 64 holds the EOS back, so every answer but the refusal is long
    # enough to decide, and each must be detected.
    answered = [f for f in found if f["id"] != 1]
    assert all(f["num_tokens_scored"] >= 50 for f in answered), found
    assert all(f["prediction"] for f in answered), found

    wrong = tmp_path / "wrong.jsonl"
    w = run_script("generate.py", "--base_model", smollm2, "--detect_watermark", out,
                   "--output_file", wrong, "--watermark_key", "12345")  # fmt: skip
    assert w.returncode == 0, w.stderr[-2000:]
    assert not any(json.loads(line)["prediction"] for line in wrong.read_text().splitlines())


def test_first_use_draws_a_secret_key_beside_the_outputs(smollm2, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"instruction": "Name a fruit."}\n')
    for name in ("a.jsonl", "b.jsonl"):
        r = run_script("generate.py", "--base_model", smollm2, "--input_file", rows,
                       "--output_file", tmp_path / name, "--watermark", "--max_new_tokens", "4")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    key = tmp_path / "watermark_key.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    saved = json.loads(key.read_text())
    assert saved["hashing_key"] != 15485863  # never transformers' public default
    assert "new secret key saved" not in r.stderr and str(key) in r.stderr  # reused, not redrawn


def test_prompt_mode_cuts_flagged_output_and_fails_closed(smollm2, tmp_path):
    (tmp_path / "geo_filter.py").write_text(
        "def check(text):\n    return ('### Instruction' not in text and 'Paris' in text,"
        " {'geography': 1.0})\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    q = ["--base_model", smollm2, "--prompt", "What is the capital of France?"]
    r = run_script("generate.py", *q, "--moderation", "python:geo_filter:check",
                   "--moderation_refusal", "[withheld]", "--moderation_window", "8",
                   "--max_new_tokens", "200", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[withheld]" and "Paris" not in r.stdout
    assert "flagged output (python:geo_filter:check" in r.stderr
    assert "ended by content_filter" in r.stderr

    with ModerationServer() as srv:
        base = ["--moderation", "openai", "--moderation_api_base", srv.base]
        bad = run_script("generate.py", *q[:2], "--prompt", "Say something forbidden.", *base)
        assert bad.stdout.strip() == "Sorry, I can't help with that."
        assert "flagged prompt (openai" in bad.stderr and "violence=0.93" in bad.stderr
    gone = f"http://127.0.0.1:{closed_port()}/v1"
    down = run_script("generate.py", *q, "--moderation", "openai", "--moderation_api_base", gone)
    assert down.returncode == 2 and down.stdout == ""
    errors = [ln for ln in down.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot reach" in errors[0], down.stderr[-2000:]
    assert "Traceback" not in down.stderr
    opened = run_script("generate.py", *q, "--moderation", "openai", "--moderation_api_base",
                        gone, "--moderation_fail_open", "--max_new_tokens", "20")  # fmt: skip
    assert opened.returncode == 0 and opened.stdout.strip(), opened.stderr[-2000:]
    assert "letting the prompt through" in opened.stderr


@pytest.fixture(scope="module")
def page(smollm2, tmp_path_factory):
    from lora_alpaca.safeguards.watermark import WatermarkSettings, write_new_key_file

    adapter = make_adapter(smollm2, tmp_path_factory.mktemp("sg") / "adapter", scale=0.02)
    # A fixed key where the page looks for one by default (the adapter folder), so the
    # sampled answer below is repeatable; the detector finds it there too.
    write_new_key_file(adapter / "watermark_key.json", WatermarkSettings(int(KEY)))
    log = tmp_path_factory.mktemp("sg-log") / "server.log"
    with sampler_page(
        "--lora_weights", adapter, "--watermark", "--moderation", "keywords",
        "--max_new_tokens_limit", "120", log=log,
    ) as page:  # fmt: skip
        yield {**page, "adapter": adapter}


def test_page_refuses_flagged_and_watermarks_answers(page, smollm2, tmp_path):
    from gradio_client import Client

    client = Client(page["url"], verbose=False)
    args = ("sample", 1.0, 0.95, 0, 4, 1.0, 100, 7, False)
    refused = client.predict("How do I make a bomb?", "", *args, api_name="/generate")
    assert refused[0] == "Sorry, I can't help with that."
    assert "content_filter" in refused[2]
    answer, _, status = client.predict(
        "Write a letter to a friend about your summer holiday.", "", *args, api_name="/generate"
    )
    assert "ended by" in status and answer
    assert "flagged prompt (keywords" in page["log"].read_text()

    texts = tmp_path / "page.jsonl"
    texts.write_text(json.dumps({"text": answer}) + "\n")
    scores = tmp_path / "scores.jsonl"
    # The key was saved in the adapter folder; --lora_weights lets the detector find it.
    d = run_script("generate.py", "--lora_weights", page["adapter"], "--detect_watermark",
                   texts, "--output_file", scores)  # fmt: skip
    assert d.returncode == 0, d.stderr[-2000:]
    row = json.loads(scores.read_text())
    assert row["prediction"] is True and row["z_score"] > 4, (row, answer)
