"""The Gradio sampler page: instruction + input, decoding controls for the chosen mode,
streamed answer, and an optional base-model answer beside it (same weights, adapter off).

Safety is server-side, not only in the sliders (a client can call the API directly):
prompt length, max_new_tokens and concurrent requests are capped here. It binds to
127.0.0.1 unless told otherwise and warns loudly when exposed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

# No phone-home: the sampler often runs on machines without internet access.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from lora_alpaca.errors import UsageError  # noqa: E402
from lora_alpaca.generate.engine import MODES, DecodingSettings, TextGenerator  # noqa: E402
from lora_alpaca.safeguards.moderation import ModerationUnavailable  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ServerLimits:
    max_input_chars: int = 4000  # instruction + input, characters
    max_new_tokens: int = 1024  # hard cap, whatever the request asks for
    concurrency_limit: int = 2  # requests generating at once (the rest wait in the queue)
    queue_size: int = 64  # waiting requests beyond this are refused


def check_request(
    gen: TextGenerator,
    instruction: str,
    input_text: str,
    settings: DecodingSettings,
    limits: ServerLimits,
) -> str | None:
    """The message to show instead of generating, or None when the request is fine."""
    if not (instruction or "").strip():
        return "Please type an instruction first."
    chars = len(instruction) + len(input_text or "")
    if chars > limits.max_input_chars:
        return (
            f"The prompt is too long: {chars} characters; this server accepts at most "
            f"{limits.max_input_chars} (instruction + input)."
        )
    try:
        settings.validate()
    except UsageError as e:
        return f"Bad setting: {e}"
    max_pos = gen.context_len()
    n = gen.prompt_tokens(gen.prompt_for(instruction, input_text))
    if max_pos and n + settings.max_new_tokens > max_pos:
        return (
            f"The prompt is {n} tokens; with max_new_tokens {settings.max_new_tokens} it exceeds "
            f"the model's context of {max_pos} tokens. Shorten it or lower max_new_tokens."
        )
    return None


def make_settings(
    mode,
    temperature,
    top_p,
    top_k,
    num_beams,
    repetition_penalty,
    max_new_tokens,
    seed,
    limits: ServerLimits,
) -> DecodingSettings:
    """Request values -> settings, with max_new_tokens clamped to the server's cap."""
    return DecodingSettings(
        mode=str(mode),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        num_beams=int(num_beams),
        repetition_penalty=float(repetition_penalty),
        max_new_tokens=max(1, min(int(max_new_tokens), limits.max_new_tokens)),
        seed=int(seed or 0),
    )


def respond(
    gen: TextGenerator,
    limits: ServerLimits,
    instruction: str,
    input_text: str,
    mode,
    temperature,
    top_p,
    top_k,
    num_beams,
    repetition_penalty,
    max_new_tokens,
    seed,
    compare: bool,
) -> Iterator[tuple[str, str, str]]:
    """Yields (adapter answer, base answer, status) as tokens arrive."""
    try:
        settings = make_settings(
            mode,
            temperature,
            top_p,
            top_k,
            num_beams,
            repetition_penalty,
            max_new_tokens,
            seed,
            limits,
        )
    except (TypeError, ValueError) as e:
        yield "", "", f"Bad setting: {e}"
        return
    problem = check_request(gen, instruction, input_text, settings, limits)
    if problem:
        yield "", "", f"⚠️ {problem}"
        return
    prompt = gen.prompt_for(instruction, input_text)
    compare = bool(compare) and gen.has_adapter
    answer, base = "", ""
    result = base_result = None
    try:
        for answer, final in gen.stream(prompt, settings, use_adapter=True):
            result = final or result
            yield answer, base, "generating…"
        if compare:  # same prompt, same seed, adapter switched off on the same weights
            for base, final in gen.stream(prompt, settings, use_adapter=False):
                base_result = final or base_result
                yield answer, base, "generating the base model's answer…"
    except ModerationUnavailable:  # fail closed: no unchecked text reaches the page
        yield "", "", "⚠️ The content filter is unavailable, so this request was refused."
        return
    status = f"ended by {result.finish_reason} after {result.new_tokens} tokens"
    if base_result is not None:
        status += f"; base: {base_result.finish_reason} after {base_result.new_tokens} tokens"
    yield answer, base, status


def decoding_controls(
    d: DecodingSettings, limits: ServerLimits, mode_id: str, follow_mode: bool
) -> list:
    """The decoding controls of both pages, in make_settings' argument order (mode,
    temperature, top_p, top_k, num_beams, repetition_penalty, max_new_tokens, seed), built
    inside the caller's layout. `follow_mode`: show only the controls the chosen mode uses."""
    sampling = d.mode == "sample" or not follow_mode
    beams = d.mode == "beam" or not follow_mode
    mode = gr.Radio(list(MODES), value=d.mode, label="Decoding", elem_id=mode_id)
    temperature = gr.Slider(
        0.05, 2.0, value=d.temperature, step=0.05, label="Temperature", visible=sampling
    )
    top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top p", visible=sampling)
    top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="Top k (0 = off)", visible=sampling)
    seed = gr.Number(value=d.seed, precision=0, label="Seed", visible=sampling)
    num_beams = gr.Slider(2, 8, value=max(2, d.num_beams), step=1, label="Beams", visible=beams)
    repetition_penalty = gr.Slider(
        1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty"
    )
    max_new_tokens = gr.Slider(
        1,
        limits.max_new_tokens,
        value=min(d.max_new_tokens, limits.max_new_tokens),
        step=1,
        label="Max new tokens",
    )
    if follow_mode:

        def show_controls(m: str):
            s, b = m == "sample", m == "beam"
            return [gr.update(visible=s)] * 4 + [gr.update(visible=b)]

        mode.change(
            show_controls,
            mode,
            [temperature, top_p, top_k, seed, num_beams],
            queue=False,
            api_visibility="private",
        )
    return [mode, temperature, top_p, top_k, num_beams, repetition_penalty, max_new_tokens, seed]


def build_demo(
    gen: TextGenerator, description: str, defaults: DecodingSettings, limits: ServerLimits
) -> gr.Blocks:
    d = defaults
    with gr.Blocks(title="lora-alpaca sampler") as demo:
        gr.Markdown(f"## lora-alpaca sampler\n{description}")
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(
                    label="Instruction",
                    lines=3,
                    elem_id="instruction",
                    max_length=limits.max_input_chars,
                    placeholder="Tell me about alpacas.",
                )
                input_box = gr.Textbox(
                    label="Input (optional)",
                    lines=2,
                    elem_id="input",
                    max_length=limits.max_input_chars,
                )
                controls = decoding_controls(d, limits, "mode", follow_mode=True)
                compare = gr.Checkbox(
                    value=False,
                    label="Compare with base model (adapter off)",
                    visible=gen.has_adapter,
                    elem_id="compare",
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                output = gr.Textbox(
                    label="Adapter answer" if gen.has_adapter else "Answer",
                    lines=14,
                    elem_id="output",
                    interactive=False,
                )
                base_output = gr.Textbox(
                    label="Base model answer (adapter off)",
                    lines=14,
                    elem_id="base_output",
                    interactive=False,
                    visible=False,
                )
                status = gr.Markdown(elem_id="status")

        compare.change(
            lambda c: gr.update(visible=bool(c)),
            compare,
            base_output,
            queue=False,
            api_visibility="private",
        )

        # Named parameters: they are the API's argument names for gradio_client users.
        def generate(
            instruction,
            input,
            mode,
            temperature,
            top_p,
            top_k,
            num_beams,
            repetition_penalty,
            max_new_tokens,
            seed,
            compare_with_base,
        ):
            yield from respond(
                gen,
                limits,
                instruction,
                input,
                mode,
                temperature,
                top_p,
                top_k,
                num_beams,
                repetition_penalty,
                max_new_tokens,
                seed,
                compare_with_base,
            )

        button.click(
            generate,
            [instruction, input_box, *controls, compare],
            [output, base_output, status],
            api_name="generate",
            concurrency_limit=limits.concurrency_limit,
        )
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency_limit)
    return demo


def exposure_warning(server_name: str, share: bool) -> str | None:
    if share:
        return (
            "WARNING: --share makes this sampler reachable by anyone with the public gradio.live "
            "link; it runs your model on your hardware for them."
        )
    if server_name not in LOOPBACK:
        return (
            f"WARNING: listening on {server_name}, not 127.0.0.1: anyone who can reach this "
            "machine on the network can use the sampler."
        )
    return None


def launch(demo: gr.Blocks, server_name: str, server_port: int | None, share: bool) -> None:
    warning = exposure_warning(server_name, share)
    if warning:
        bar = "!" * min(len(warning), 100)
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
    demo.launch(
        server_name=server_name,
        server_port=server_port,
        share=share,
        show_error=False,
        inbrowser=False,
    )
