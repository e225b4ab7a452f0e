"""Chat messages -> the prompt text the model was trained on, through the project's one
renderer (`lora_alpaca.chat_template.ChatRenderer`): each model id carries the renderer its
adapter was trained with (`serve.models.load_served`), the same one the sampler's chat page
and `generate.py --input_file` message rows use. For an Alpaca-trained adapter a single user
turn renders to exactly the Alpaca prompt of training.
"""

from __future__ import annotations

from lora_alpaca.chat_template import TemplateRenderError
from lora_alpaca.serve.errors import ApiError


def render_chat(served, entry, messages: list[dict]) -> str:
    """The prompt text for `messages`; a conversation the template cannot render is a 400."""
    # OpenAI's newer clients send the system prompt as role "developer".
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    try:
        return entry.renderer.prompt_text(messages)
    except TemplateRenderError as e:
        raise ApiError(400, f"messages: model {entry.model_id!r}: {e}", "messages") from None
