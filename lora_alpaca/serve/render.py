"""Chat messages -> the prompt text the model was trained on.

ONE function on purpose: the conversations issue brings the project's single renderer
(`lora_alpaca.chat_template.ChatRenderer`, built from the adapter manifest and tokenizer);
swapping this body for it is the whole change.
"""

from __future__ import annotations

from lora_alpaca.serve.errors import ApiError


def render_chat(served, entry, messages: list[dict]) -> str:
    """A single user turn (after an optional system message) becomes exactly the template's
    Alpaca prompt (as `generate.py --prompt` builds it); longer conversations go through the
    tokenizer's chat template when it has one, else a 400."""
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    if len(turns) == 1 and turns[0]["role"] == "user":
        prompt = entry.template.build_prompt(turns[0]["content"], None)
        # The Alpaca templates have no system slot: a system message goes before the prompt.
        return f"{system}\n\n{prompt}" if system else prompt
    tok = served.tokenizer
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ApiError(
        400,
        f"messages: model {entry.model_id!r} was trained on the {entry.template.name} template, "
        "which holds one user turn (plus an optional system message), and its tokenizer has no "
        "chat template for longer conversations",
        "messages",
    )
