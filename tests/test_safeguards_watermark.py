"""The watermark on the real SmolLM2 on CPU: sampled ~100-token answers from several prompts
are detected, the same prompts unwatermarked are not, a wrong key detects nothing, and the
verdict survives a decode / re-encode round trip. Plus the key file rules."""

from __future__ import annotations

import json
import stat

import pytest

from lora_alpaca.errors import UsageError
from lora_alpaca.generate.engine import DecodingSettings
from lora_alpaca.safeguards.detect import Detector
from lora_alpaca.safeguards.guard import Safeguards
from lora_alpaca.safeguards.watermark import (
    LIBRARY_PUBLIC_KEY,
    WatermarkSettings,
    resolve_settings,
)

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Describe the city of Paris for a tourist.",
    "Explain how a bicycle works.",
    "Write a letter to a friend about your summer holiday.",
]
KEY = 918273645564738291


@pytest.fixture(scope="module")
def answers(smollm2):
    from lora_alpaca.generate.loading import LoadRequest, load_generator

    gen = load_generator(LoadRequest(base_model=str(smollm2), device="cpu")).generator
    settings = DecodingSettings("sample", 1.0, 0.95, 0, max_new_tokens=100, seed=7)
    prompts = [gen.prompt_for(p) for p in PROMPTS]
    gen.safeguards = Safeguards(watermark=WatermarkSettings(KEY))
    marked = gen.generate(prompts, settings)
    gen.safeguards = None
    plain = gen.generate(prompts, settings)
    return gen, [r.text for r in marked], [r.text for r in plain]


@pytest.mark.slow
def test_watermarked_detected_plain_and_wrong_key_not(answers):
    gen, marked, plain = answers
    right = Detector(gen.model.config, gen.tokenizer, WatermarkSettings(KEY))
    wrong = Detector(gen.model.config, gen.tokenizer, WatermarkSettings(KEY + 1))
    scored = [right.score(t) for t in marked]
    # Answers end at EOS, so not all reach 100 tokens. A soft watermark (delta 2) moves the
    # sampling only where the model is unsure, so a low-entropy answer carries little of it:
    # on fp32 SmolLM2 (a CPU without bf16) one 46-token answer scored z 2.6, on bf16 all
    # long answers scored > 4.5. Claimed here: most long answers are detected far below the
    # threshold's p-value, and the marked answers' z-scores stand well above the plain ones'.
    long = [s for s in scored if s["num_tokens_scored"] >= 40]
    assert len(long) >= 3, scored
    detected = [s for s in long if s["prediction"] and s["p_value"] < 1e-5]
    assert len(detected) >= 2, scored
    plain_scored = [right.score(t) for t in plain]
    assert not any(s["prediction"] for s in plain_scored), plain_scored
    plain_long = [s["z_score"] for s in plain_scored if s["num_tokens_scored"] >= 40]
    mean = sum(s["z_score"] for s in long) / len(long)
    assert plain_long and mean > sum(plain_long) / len(plain_long) + 3, (scored, plain_scored)
    assert not any(wrong.score(t)["prediction"] for t in marked)
    # Decode / re-encode: the detector only ever sees text, so a copy-pasted answer
    # (tokenized afresh) scores the same as the original.
    for t, s in zip(marked, scored, strict=True):
        again = gen.tokenizer.decode(gen.tokenizer(t, add_special_tokens=False)["input_ids"])
        assert right.score(again) == s


@pytest.mark.slow
def test_short_texts_are_not_judged(answers):
    gen, marked, _ = answers
    det = Detector(gen.model.config, gen.tokenizer, WatermarkSettings(KEY), min_tokens=16)
    short = det.score(" ".join(marked[0].split()[:5]))
    assert short["verdict"] == "too_short" and short["prediction"] is None
    assert det.score("")["verdict"] == "too_short"


def test_key_file_created_secret_and_reused(tmp_path):
    f = tmp_path / "watermark_key.json"
    s1, where = resolve_settings(None, f, 0.25, 2.0, "lefthash", 1, create=True)
    assert "new" in where and s1.hashing_key != LIBRARY_PUBLIC_KEY
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    s2, _ = resolve_settings(None, f, 0.5, 9.0, "selfhash", 3, create=True)
    assert s2 == s1  # the file's settings win; never rewritten
    other = tmp_path / "b" / "watermark_key.json"
    other.parent.mkdir()
    s3, _ = resolve_settings(None, other, 0.25, 2.0, "lefthash", 1, create=True)
    assert s3.hashing_key != s1.hashing_key  # drawn with secrets, not a fixed default
    assert json.loads(f.read_text())["hashing_key"] == s1.hashing_key
    with pytest.raises(UsageError, match="not found"):
        resolve_settings(None, tmp_path / "none.json", 0.25, 2.0, "lefthash", 1, create=False)
    with pytest.raises(UsageError, match="greenlist_ratio"):
        resolve_settings(5, f, 1.5, 2.0, "lefthash", 1, create=False)
