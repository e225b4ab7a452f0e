"""Template parity: the same conversations rendered by (a) the training renderer, (b) the
exported tokenizer's `apply_chat_template`, (c) the GGUF's embedded `tokenizer.chat_template`
(read back with the gguf reader, rendered with jinja2) must give identical token ids, and
the GGUF must declare the template's end-of-turn token as an end-of-generation id.
"""

from __future__ import annotations

from pathlib import Path

from lora_alpaca.chat_template import ChatRenderer, TemplateRenderError, _compile

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks!"},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Is water wet?"},
    ],
]


def _cases(renderer: ChatRenderer) -> list[tuple[list[dict], bool, list[int]]]:
    """(messages, add_generation_prompt, training ids) for every case the template renders."""
    out = []
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            try:
                text = renderer.render(msgs, add_generation_prompt=gen)
            except TemplateRenderError:
                continue  # e.g. a template without a system role
            out.append((msgs, gen, renderer._ids([text])[0]))
    return out


def gguf_chat_template(path: Path) -> tuple[str | None, set[int]]:
    """The embedded chat template and the end-of-generation ids a GGUF declares."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def value(key):
        f = fields.get(key)
        if f is None:
            return None
        part = f.parts[f.data[0]]
        return (
            bytes(part).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else int(part[0])
        )

    eog = {
        v
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if (v := value(k)) is not None
    }
    return value("tokenizer.chat_template"), eog


def template_parity(
    renderer: ChatRenderer, tokenizer_dir: Path | None, gguf_files: list[Path]
) -> dict:
    from transformers import AutoTokenizer

    cases = _cases(renderer)
    failures: list[str] = []
    checked = 0
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        for msgs, gen, want in cases:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            got = tok(text, add_special_tokens=False)["input_ids"]
            checked += 1
            if got != want:
                failures.append(
                    f"transformers tokenizer: {len(msgs)}-message conversation renders other ids"
                )
    for path in gguf_files:
        source, eog = gguf_chat_template(path)
        if source is None:
            failures.append(f"{path.name}: no tokenizer.chat_template")
            continue
        template = _compile(source)
        for msgs, gen, want in cases:
            text = template.render(messages=msgs, add_generation_prompt=gen, **renderer._specials)
            checked += 1
            if renderer._ids([text])[0] != want:
                failures.append(f"{path.name}: {len(msgs)}-message conversation renders other ids")
        missing = set(renderer.eog_token_ids) - eog
        if missing:
            failures.append(f"{path.name}: end-of-generation id(s) {sorted(missing)} not declared")
    return {
        "target": "chat template (training renderer / tokenizer / GGUF)",
        "passed": not failures and checked > 0,
        "failures": failures or ([] if checked else ["nothing to compare"]),
        "prompts_checked": checked,
    }
