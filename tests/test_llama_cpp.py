"""The exported files in a real GGUF runtime: llama.cpp's `llama-completion`, built from the
sources llama-cpp-python 0.3.36 vendors (tests/llama_cpp_build.sh; CI builds it before the
suite, here it is built on first use, never skipped).

- greedy continuations from the merged GGUF and from base GGUF + `--lora` adapter GGUF
  equal transformers' greedy continuation of base + PEFT adapter (tiny model, parity's own
  reference tokens compared as text: llama.cpp prints pieces, not ids);
- on SmolLM2 with the Alpaca template, generation ends where the sampler ends: at EOS (a
  GGUF end-of-generation id) or at a stop string. llama.cpp honours multi-token stop strings
  only as `-r` reverse prompts (Ollama: the Modelfile's PARAMETER stop); the GGUF cannot
  carry them, and without them llama.cpp runs on to the length cap, shown here too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

CAP = 40  # new tokens; every case below ends well before it (or is shown to run into it)
END = " [end of text]\n"  # what llama-completion prints when it samples an EOG token


@pytest.fixture(scope="session")
def llama_completion() -> Path:
    r = subprocess.run(
        ["bash", str(ROOT / "tests" / "llama_cpp_build.sh")],
        capture_output=True,
        text=True,
        timeout=5400,  # a first build on 2 busy cores; CI builds it before the suite
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1]) / "llama-completion"


def complete(binary: Path, model: Path, prompt: str, *extra: str, n: int = CAP) -> tuple[str, bool]:
    """(generated text, ended on an EOG token) from llama-completion, greedy, CPU, 1 thread."""
    cmd = [str(binary), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0"]
    cmd += ["-no-cnv", "--no-display-prompt", "-c", "512", "-t", "1", "--no-warmup", *extra]
    # llama.cpp 0.3.36 prints through an async logger it never joins at exit (its issue
    # 22142), so a run's last output can be lost on a busy machine. The queue is in order
    # and "\n\n" is the last text it prints: a run whose stdout ends with it is complete.
    for _ in range(30):
        r = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-3000:]
        if r.stdout.endswith(b"\n\n"):
            break
    else:
        raise AssertionError(
            f"llama-completion never printed its whole output: {r.stdout[-200:]!r}"
        )
    # Pieces are raw bytes (a random model splits UTF-8 sequences); decoded as transformers'
    # byte-level decoder does, invalid bytes as U+FFFD.
    out = r.stdout.decode("utf-8", errors="replace")[:-2]
    return (out[: -len(END)], True) if out.endswith(END) else (out, False)


def test_merged_and_lora_gguf_greedy_match_transformers(llama_completion, ship_bundle):
    from transformers import AutoTokenizer

    out, _, adapter = ship_bundle
    tok = AutoTokenizer.from_pretrained(adapter)
    report = json.loads((out / "parity.json").read_text())
    rows = report["checks"][[c["target"] for c in report["checks"]].index("gguf f16")]["greedy"]
    assert len(rows) == 3
    differs = 0
    for row in rows:
        prompt = report["prompts"][row["prompt"]]
        ref = row["reference"]  # base + PEFT adapter in transformers, fp32, greedy
        eos = ref[-1:] == [tok.eos_token_id]
        want = (tok.decode(ref[:-1] if eos else ref), eos)
        n = len(ref)
        merged = complete(llama_completion, out / "model-f16.gguf", prompt, n=n)
        lora_flag = ("--lora", str(out / "adapter-f16.gguf"))
        lora = complete(llama_completion, out / "base-f16.gguf", prompt, *lora_flag, n=n)
        assert merged == want, (prompt, merged, want)
        assert lora == want, (prompt, lora, want)
        differs += complete(llama_completion, out / "base-f16.gguf", prompt, n=n) != want
    assert differs  # the adapter GGUF changed what the base says


@pytest.fixture(scope="module")
def smollm2_alpaca(smollm2, tmp_path_factory):
    """SmolLM2 as a GGUF with the Alpaca template, its Modelfile, and the sampler's stops."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.chat_template import build_renderer
    from lora_alpaca.export.gguf import write_gguf
    from lora_alpaca.export.modelfile import modelfile, stop_parameters
    from lora_alpaca.prompts import load_template

    template = load_template("alpaca")
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    renderer = build_renderer(tok, "alpaca", template)
    path = tmp_path_factory.mktemp("smol") / "model-f16.gguf"
    write_gguf(model, tok, template, path, "f16", "smol", renderer=renderer)
    text = modelfile(renderer, path.name)
    stops = stop_parameters(text)
    return model, tok, template, path, stops


# Greedy SmolLM2 continuations (checked in transformers first): one ends at EOS, one runs
# on into a new "### Instruction:" section. Not here: "What is the capital of France?",
# which goes on "\n\n### Explanation:"; the sampler stops at "\n### ", llama-completion's
# -r does not (it only looks at the last len(stop)+2 characters after each token, and the
# token " Explanation" completes the stop with 12 more), Ollama and llama-server do.
PROMPTS = [
    ("List three fruits.", "", "eos"),
    ("Name a primary colour.", "Red.\n\n### Instruction:\nName another primary colour.\n\n### Response:\n", "stop_string"),
]  # fmt: skip


@pytest.mark.parametrize("instruction, follow, reason", PROMPTS)
def test_llama_cpp_stops_where_the_sampler_stops(
    llama_completion, smollm2_alpaca, instruction, follow, reason
):
    from lora_alpaca.generate.engine import (
        DecodingSettings,
        build_generation_config,
        cut_at_stop,
        eos_token_ids,
        finish,
    )

    model, tok, template, gguf_path, stops = smollm2_alpaca
    prompt = template.build_prompt(instruction) + follow
    # The sampler (generate.py's engine): greedy, EOS ids and the template's stop strings.
    settings = DecodingSettings(mode="greedy", max_new_tokens=CAP)
    config = build_generation_config(settings, model, tok, template.stop_strings)
    ids = tok(prompt, return_tensors="pt")
    new = model.generate(**ids, generation_config=config, tokenizer=tok)[
        0, ids["input_ids"].shape[1] :
    ]
    result = finish(new.tolist(), tok, eos_token_ids(model, tok), template.stop_strings)
    assert result.finish_reason == reason and result.new_tokens < CAP

    # The Modelfile's PARAMETER stop lines as -r, except any the prompt itself ends with:
    # llama-completion also searches the prompt's last len+2 characters for a reverse
    # prompt and would stop before the first token (the Alpaca prompt ends "### Response:\n").
    rflags = [a for s in stops if s not in prompt[-len(s) - 2 :] for a in ("-r", s)]
    assert "### Response:" not in rflags and "### Instruction:" in rflags
    text, eog = complete(llama_completion, gguf_path, prompt, *rflags)
    assert cut_at_stop(text, template.stop_strings).strip() == result.text, repr(text)
    if reason == "eos":
        assert eog  # the GGUF's EOS id is an end-of-generation token for llama.cpp
    else:
        assert not eog and any(s in text for s in template.stop_strings)
        # Without the stops the GGUF alone does not end there: llama.cpp runs on past it.
        plain, _ = complete(llama_completion, gguf_path, prompt)
        kept = cut_at_stop(text, template.stop_strings)
        assert plain.startswith(text) and len(plain) > len(text)
        assert cut_at_stop(plain, template.stop_strings) == kept
