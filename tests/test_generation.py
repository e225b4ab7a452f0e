"""The generation module on a tiny random model: real transformers/peft code, no mocks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from adapters import make_adapter

from lora_alpaca.errors import UsageError
from lora_alpaca.generate.engine import DecodingSettings, TextGenerator, finish, safe_stream_prefix
from lora_alpaca.generate.loading import LoadRequest, load_generator
from lora_alpaca.generate.probe import leaks_header, probe, repeated_ngram_share, report_markdown
from lora_alpaca.prompts import load_template, parse_template

INSTRUCTIONS = [
    ("Give three tips for staying healthy.", None),
    ("What is the capital of France?", "France is a country in Europe."),
    ("Classify the sentiment of the review as positive or negative.", "The quick brown fox."),
    ("Hi", None),
]


@pytest.fixture(scope="module")
def base_gen(tiny_model) -> TextGenerator:
    torch.set_num_threads(1)
    return load_generator(LoadRequest(base_model=str(tiny_model), dtype="fp32")).generator


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    return make_adapter(
        tiny_model, tmp_path_factory.mktemp("adapter") / "out", template_name="alpaca_short"
    )


def prompts(gen: TextGenerator) -> list[str]:
    return [gen.prompt_for(i, x) for i, x in INSTRUCTIONS]


def with_stops(gen: TextGenerator, stops: list[str]) -> TextGenerator:
    data = {**load_template("alpaca").to_dict(), "stop_strings": stops}
    return TextGenerator(gen.model, gen.tokenizer, parse_template(data, "test", "test"))


def texts(results) -> list[str]:
    return [r.text for r in results]


def test_modes_really_differ_and_seed_repeats(base_gen):
    p = prompts(base_gen)
    greedy = texts(base_gen.generate(p, DecodingSettings(mode="greedy", max_new_tokens=24)))
    sample1 = texts(
        base_gen.generate(p, DecodingSettings(mode="sample", seed=1, max_new_tokens=24))
    )
    sample1_again = texts(
        base_gen.generate(p, DecodingSettings(mode="sample", seed=1, max_new_tokens=24))
    )
    sample2 = texts(
        base_gen.generate(p, DecodingSettings(mode="sample", seed=2, max_new_tokens=24))
    )
    beam = texts(
        base_gen.generate(p, DecodingSettings(mode="beam", num_beams=4, max_new_tokens=24))
    )
    assert sample1 == sample1_again  # same seed, same sample
    assert sample1 != sample2
    assert sample1 != greedy
    assert beam != greedy  # beam search keeps other hypotheses than the argmax path
    # Sampling knobs act in sample mode: a tiny temperature collapses onto the greedy path.
    cold = texts(
        base_gen.generate(
            p, DecodingSettings(mode="sample", temperature=1e-4, seed=3, max_new_tokens=24)
        )
    )
    assert cold == greedy
    # ...and are not silently ignored: greedy output does not depend on them.
    greedy_hot = texts(
        base_gen.generate(
            p, DecodingSettings(mode="greedy", temperature=1.9, top_k=3, max_new_tokens=24)
        )
    )
    assert greedy_hot == greedy


def test_batched_greedy_equals_one_by_one(base_gen):
    p = prompts(base_gen)  # different lengths: the batch is left-padded
    lengths = {base_gen.prompt_tokens(x) for x in p}
    assert len(lengths) > 1
    settings = DecodingSettings(max_new_tokens=20, repetition_penalty=1.2)
    batched = base_gen.generate(p, settings)
    single = [base_gen.generate([x], settings)[0] for x in p]
    assert batched == single


def test_stop_string_cuts_and_is_reported(base_gen):
    p = prompts(base_gen)[0]
    free = base_gen.generate([p], DecodingSettings(max_new_tokens=40))[0]
    assert free.finish_reason == "length" and free.new_tokens == 40
    words = free.text.split()
    assert len(words) > 6
    stop = " " + words[5]  # a string the model really produces, midway through its answer
    expected = free.text[: free.text.index(stop)].strip()
    gen = with_stops(base_gen, [stop])
    cut = gen.generate([p], DecodingSettings(max_new_tokens=40))[0]
    assert cut.finish_reason == "stop_string"
    assert cut.text == expected and stop.strip() not in cut.text.split()[-1:]
    assert cut.new_tokens < 40  # generation really stopped early, not just trimmed afterwards
    streamed = list(gen.stream(p, DecodingSettings(max_new_tokens=40)))
    assert streamed[-1][1] == cut
    for text, _ in streamed:  # the stop string is never shown, not even for a moment
        assert stop not in text and expected.startswith(text.strip())


def test_eos_ends_generation(base_gen, tiny_model):
    p = prompts(base_gen)[1]
    free = base_gen.generate([p], DecodingSettings(max_new_tokens=30))[0]
    enc = base_gen.tokenizer(p, return_tensors="pt")
    with torch.inference_mode():
        out = base_gen.model.generate(
            **enc,
            max_new_tokens=30,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=base_gen.tokenizer.pad_token_id,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    k = 7
    gen = TextGenerator(base_gen.model, base_gen.tokenizer, base_gen.template)
    gen.eos_ids = [*gen.eos_ids, new[k]]  # pretend the 8th token is this model's EOS
    original = base_gen.model.generation_config.eos_token_id
    base_gen.model.generation_config.eos_token_id = gen.eos_ids
    try:
        res = gen.generate([p], DecodingSettings(max_new_tokens=30))[0]
    finally:
        base_gen.model.generation_config.eos_token_id = original
    first = new.index(new[k])
    assert res.finish_reason == "eos" and res.new_tokens == first + 1
    assert res.text == base_gen.tokenizer.decode(new[:first], skip_special_tokens=True).strip()
    assert free.text.startswith(res.text)


def test_finish_reasons_with_pad_equal_to_eos(base_gen):
    tok = base_gen.tokenizer
    a, b = tok("alpha beta")["input_ids"], tok(" ### Instruction: more")["input_ids"]
    eos = tok.eos_token_id
    stops = ["### Instruction:"]
    assert finish(a + [eos, eos], tok, [eos], stops).finish_reason == "eos"
    r = finish(a + b + [eos], tok, [eos], stops)  # batch rows finished by a stop string get padded
    assert r.finish_reason == "stop_string" and r.text == "alpha beta"
    assert finish(a, tok, [eos], stops).finish_reason == "length"


def test_safe_stream_prefix_holds_back_partial_stop():
    stops = ["### Instruction:"]
    assert safe_stream_prefix("Paris is nice.\n##", stops) == "Paris is nice.\n"
    assert safe_stream_prefix("Paris is nice.\n### Instruction: x", stops) == "Paris is nice.\n"
    assert safe_stream_prefix("Paris #", stops) == "Paris "
    assert safe_stream_prefix("Paris #1", stops) == "Paris #1"
    assert safe_stream_prefix("Paris", stops) == "Paris"


def test_stream_equals_generate_and_arrives_in_pieces(base_gen):
    p = prompts(base_gen)[2]
    settings = DecodingSettings(mode="sample", seed=5, max_new_tokens=30)
    expected = base_gen.generate([p], settings)[0]
    updates = list(base_gen.stream(p, settings))
    assert updates[-1][1] == expected
    assert len(updates) > 3 and all(r is None for _, r in updates[:-1])
    beam = list(base_gen.stream(p, DecodingSettings(mode="beam", max_new_tokens=10)))
    assert len(beam) == 1 and beam[0][1] is not None


def test_bad_settings_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="--temperature"):
        DecodingSettings(mode="sample", temperature=0).validate()
    with pytest.raises(UsageError, match="--num_beams"):
        DecodingSettings(mode="beam", num_beams=1).validate()
    with pytest.raises(UsageError, match="--top_p"):
        DecodingSettings(top_p=1.5).validate()


def test_adapter_loads_from_manifest_and_differs_from_base(adapter_dir, base_gen):
    loaded = load_generator(LoadRequest(lora_weights=str(adapter_dir), dtype="fp32"))
    gen = loaded.generator
    assert gen.has_adapter and gen.template.name == "alpaca_short"  # template from the manifest
    p = [gen.prompt_for(i, x) for i, x in INSTRUCTIONS]
    s = DecodingSettings(max_new_tokens=16)
    with_adapter = gen.generate(p, s)
    without = gen.generate(p, s, use_adapter=False)
    assert texts(with_adapter) != texts(without)
    assert texts(without) == texts(base_gen.generate(p, s))  # adapter off == the plain base model
    assert texts(gen.generate(p, s)) == texts(with_adapter)  # and it is switched back on after


def test_adapter_on_wrong_base_is_refused(adapter_dir, tmp_path):
    from tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", arch="qwen2")
    with pytest.raises(UsageError, match="fingerprint"):
        load_generator(LoadRequest(base_model=str(other), lora_weights=str(adapter_dir)))
    # adapter_model.bin refused without the flag: told once, in test_security.py
    manifest = json.loads((adapter_dir / "lora_alpaca.json").read_text())
    assert manifest["template"]["name"] == "alpaca_short"


def test_probe_measures():
    assert repeated_ngram_share("a b c d") == 0.0
    assert repeated_ngram_share("go go go go go go go go") == pytest.approx(1 - 1 / 5)
    assert leaks_header("Sure.\n\n### Output:\nmore")
    assert leaks_header("Answer\nInstruction: do it")
    assert not leaks_header("The response was fine: yes.")
    rows = [
        {"response": "Paris.", "finish_reason": "eos", "new_tokens": 3},
        {"response": "Hi.\n### Example:\nx", "finish_reason": "length", "new_tokens": 10},
        {"response": "no no no no no no no no", "finish_reason": "stop_string", "new_tokens": 9},
        {"response": "", "finish_reason": "eos", "new_tokens": 1},
    ]
    r = probe(rows)
    assert (r.ended_share, r.eos_share, r.stop_string_share, r.length_share) == (
        0.75,
        0.5,
        0.25,
        0.25,
    )
    assert r.header_leak_share == 0.25 and r.degenerate_share == 0.25 and r.empty_share == 0.25
    assert r.mean_new_tokens == pytest.approx(23 / 4)
    md = report_markdown(r, "t", "setup")
    assert "| prompts | 4 |" in md and "75.0%" in md
    assert dataclasses.asdict(r) == r.as_dict()


def test_merged_model_folder_uses_its_manifest_copy(tiny_model, adapter_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model, merged)  # stands in for export_hf_checkpoint.py's output
    shutil.copy(adapter_dir / "lora_alpaca.json", merged / "lora_alpaca.json")
    gen = load_generator(LoadRequest(base_model=str(merged), dtype="fp32")).generator
    assert not gen.has_adapter and gen.template.name == "alpaca_short"
    override = load_generator(
        LoadRequest(base_model=str(merged), prompt_template_name="vigogne", dtype="fp32")
    )
    assert override.generator.template.name == "vigogne"
