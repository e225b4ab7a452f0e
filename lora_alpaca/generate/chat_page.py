"""The sampler's Chat page beside the instruction page: multi-turn with a system prompt,
streaming, stop, regenerate, clear, the instruction page's decoding controls, and the base
model's answer (adapter off, same conversation) side by side.

Conversations are rendered by the adapter's ChatRenderer (lora_alpaca.chat_template), the
same code that rendered them for training, so the page prompts the model exactly as it
was trained. An adapter trained on conversations opens on this page.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from lora_alpaca.chat_template import ChatRenderer, TemplateRenderError
from lora_alpaca.generate.engine import DecodingSettings, TextGenerator
from lora_alpaca.generate.ui import ServerLimits, build_demo, decoding_controls, make_settings


def message_row(row: dict, where: str) -> dict:
    """A --input_file row {"messages": [...]} ending with a user turn, checked."""
    from lora_alpaca.errors import UsageError

    msgs = row["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in msgs
    )  # fmt: skip
    if not ok or msgs[-1]["role"] != "user":
        raise UsageError(
            f"--input_file {where}: 'messages' must be a list of {{role: system|user|assistant, "
            "content: string}} ending with a user turn"
        )
    return {k: v for k, v in row.items() if k in ("id", "messages")}


def message_text(content) -> str:
    """A chat message's text: gradio's Chatbot hands history back as a list of parts
    ([{"type": "text", "text": ...}]), API clients may send a plain string."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return str(content)


def chat_prompt(renderer: ChatRenderer, system: str, history: list[dict], user: str) -> str:
    """The rendered conversation, ready for the generator (`ChatRenderer.prompt_text`)."""
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": m["role"], "content": message_text(m["content"])} for m in history
    ]
    return renderer.prompt_text(messages + [{"role": "user", "content": user}])


def chat_respond(
    gen: TextGenerator,
    renderer: ChatRenderer,
    limits: ServerLimits,
    system: str,
    history: list[dict],
    user: str,
    settings: DecodingSettings,
    compare: bool,
) -> Iterator[tuple[list[dict], list[dict], str]]:
    """Yields (adapter chat, base chat, status) while the answer streams in."""
    if not user.strip():
        yield history, history, "Please type a message."
        return
    if len(user) + len(system) > limits.max_input_chars:
        yield history, history, f"⚠️ Message too long (limit {limits.max_input_chars} characters)."
        return
    try:
        prompt = chat_prompt(renderer, system, history, user)
    except TemplateRenderError as e:
        yield history, history, f"⚠️ The chat template cannot render this conversation: {e}"
        return
    asked = history + [{"role": "user", "content": user}]
    answer = base = ""
    result = None
    # The renderer's end-of-turn ids end the answer even where they are not the tokenizer's EOS.
    eog = renderer.eog_token_ids
    for answer, final in gen.stream(prompt, settings, use_adapter=True, eog_ids=eog):
        result = final or result
        yield asked + [{"role": "assistant", "content": answer}], asked, "generating…"
    turn = sum(m["role"] == "user" for m in asked)
    status = f"turn {turn}: ended by {result.finish_reason} after {result.new_tokens} tokens"
    if compare and gen.has_adapter:
        status += "; base model answered beside it"
        for base, _final in gen.stream(prompt, settings, use_adapter=False, eog_ids=eog):
            yield (
                asked + [{"role": "assistant", "content": answer}],
                asked + [{"role": "assistant", "content": base}],
                "generating the base model's answer…",
            )
    yield (
        asked + [{"role": "assistant", "content": answer}],
        asked + ([{"role": "assistant", "content": base}] if base else []),
        status,
    )


def build_chat(gen, renderer: ChatRenderer, defaults: DecodingSettings, limits: ServerLimits):
    d = defaults
    with gr.Row():
        with gr.Column(scale=1):
            system = gr.Textbox(label="System prompt (optional)", lines=2, elem_id="chat_system")
            controls = decoding_controls(d, limits, "chat_mode", follow_mode=False)
            compare = gr.Checkbox(
                value=False, label="Side by side with the base model (adapter off)",
                visible=gen.has_adapter, elem_id="chat_compare",
            )  # fmt: skip
        with gr.Column(scale=2):
            with gr.Row():
                chat = gr.Chatbot(label="Adapter" if gen.has_adapter else "Chat", elem_id="chat")
                base_chat = gr.Chatbot(label="Base model (adapter off)", elem_id="base_chat")
            user = gr.Textbox(label="Message", lines=2, elem_id="chat_input")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat_send")
                stop = gr.Button("Stop", elem_id="chat_stop")
                regenerate = gr.Button("Regenerate", elem_id="chat_regenerate")
                clear = gr.Button("Clear", elem_id="chat_clear")
            status = gr.Markdown(elem_id="chat_status")

    def run(system, history, message, compare_with_base, *ctl):
        try:
            settings = make_settings(*ctl, limits)
        except (TypeError, ValueError) as e:
            yield history, history, f"Bad setting: {e}", message
            return
        for a, b, s in chat_respond(
            gen,
            renderer,
            limits,
            system,
            list(history or []),
            message,
            settings,
            bool(compare_with_base),
        ):
            yield a, b, s, ""

    def again(system, history, compare_with_base, *ctl):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            yield [], [], "Nothing to regenerate.", ""
            return
        last = message_text(history.pop()["content"])
        yield from run(system, history, last, compare_with_base, *ctl)

    outs = [chat, base_chat, status, user]
    sent = send.click(run, [system, chat, user, compare, *controls], outs, api_name="chat")
    submitted = user.submit(
        run, [system, chat, user, compare, *controls], outs, api_visibility="private"
    )
    redone = regenerate.click(
        again, [system, chat, compare, *controls], outs, api_visibility="private"
    )
    stop.click(None, None, None, cancels=[sent, submitted, redone], api_visibility="private")
    clear.click(lambda: ([], [], "", ""), None, outs, queue=False, api_visibility="private")


def build_app(
    gen: TextGenerator,
    renderer: ChatRenderer,
    description: str,
    defaults: DecodingSettings,
    limits: ServerLimits,
    chat_first: bool,
) -> gr.Blocks:
    """Instruction page + Chat page in one sampler; `chat_first` opens on the chat page."""
    instruction = build_demo(gen, description, defaults, limits)
    with gr.Blocks(title="lora-alpaca sampler") as app:
        with gr.Tabs(selected="chat" if chat_first else "instruction"):
            with gr.Tab("Instruction", id="instruction", elem_id="tab_instruction"):
                instruction.render()
            with gr.Tab("Chat", id="chat", elem_id="tab_chat"):
                gr.Markdown(f"Chat template: `{renderer.spec}`")
                build_chat(gen, renderer, defaults, limits)
    app.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency_limit)
    return app
