"""Chat answers end at the renderer's end-of-turn token when it is not the tokenizer's EOS
(Qwen-style: `<|im_end|>` closes a turn, EOS is another token), at token level on a tiny
model: TextGenerator (generate and stream), the chat page's respond loop and the batch CLI's
rows. Also: generation raises no transformers deprecation warning (`past_key_values`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_conversations import CHATML
from tiny import make_tiny_model

from lora_alpaca.chat_template import ChatRenderer
from lora_alpaca.generate.batch import generate_rows
from lora_alpaca.generate.chat_page import chat_prompt, chat_respond
from lora_alpaca.generate.engine import DecodingSettings
from lora_alpaca.generate.loading import LoadRequest, load_generator
from lora_alpaca.generate.ui import ServerLimits

QUESTION = "What is the capital of France?"
SETTINGS = DecodingSettings(mode="greedy", max_new_tokens=24)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A tiny ChatML model whose greedy answer holds `<|im_end|>` at a known step.

    The lm_head rows of `<|im_end|>` and of a token t the free greedy answer produces are
    swapped: the answer is unchanged up to t's first step, where `<|im_end|>` comes instead
    (with t's logit). EOS stays `</s>`, so only the renderer's ids can end the turn there."""
    torch.set_num_threads(1)
    path = make_tiny_model(tmp_path_factory.mktemp("chatml") / "model")
    gen = load_generator(LoadRequest(base_model=str(path), dtype="fp32")).generator
    tok = gen.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    gen.model.resize_token_embeddings(len(tok))
    renderer = ChatRenderer(tok, CHATML, "test-chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert renderer.eog_token_ids == [tok.eos_token_id, im_end] and im_end != tok.eos_token_id
    prompt = chat_prompt(renderer, "", [], QUESTION)
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = gen.model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=None)
    free = out[0, enc["input_ids"].shape[1] :].tolist()
    t = free[5]
    assert im_end not in free and tok.eos_token_id not in free[:6], free
    head = gen.model.get_output_embeddings().weight
    with torch.no_grad():
        head[[t, im_end]] = head[[im_end, t]]
    first = free.index(t)
    return gen, renderer, prompt, free, first


def test_generate_and_stream_stop_at_end_of_turn(chatml):
    gen, renderer, prompt, free, first = chatml
    want = gen.tokenizer.decode(free[:first], skip_special_tokens=True).strip()
    # Control: with the tokenizer's EOS only, the answer runs past <|im_end|> to its length.
    control = gen.generate([prompt], SETTINGS)[0]
    assert control.finish_reason == "length" and control.new_tokens == 24
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = gen.generate([prompt], SETTINGS, eog_ids=renderer.eog_token_ids)[0]
        streamed = [r for _, r in gen.stream(prompt, SETTINGS, eog_ids=renderer.eog_token_ids)]
        beam = gen.stream(prompt, DecodingSettings(mode="beam", num_beams=2, max_new_tokens=24))
        list(beam)
    assert (res.finish_reason, res.new_tokens, res.text) == ("eos", first + 1, want)
    assert streamed[-1] == res
    noisy = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert noisy == [], noisy


def test_chat_page_and_batch_rows_stop_at_end_of_turn(chatml):
    gen, renderer, _prompt, free, first = chatml
    *_, (chat, _base, status) = chat_respond(
        gen, renderer, ServerLimits(), "", [], QUESTION, SETTINGS, False
    )
    assert status == f"turn 1: ended by eos after {first + 1} tokens", status
    want = gen.tokenizer.decode(free[:first], skip_special_tokens=True).strip()
    assert chat[-1] == {"role": "assistant", "content": want}
    rows = [{"messages": [{"role": "user", "content": QUESTION}]}]
    (row,) = generate_rows(gen, rows, SETTINGS, batch_size=2, progress=False, renderer=renderer)
    assert (row["finish_reason"], row["new_tokens"], row["response"]) == ("eos", first + 1, want)
