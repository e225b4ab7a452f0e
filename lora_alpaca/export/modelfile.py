"""An Ollama `Modelfile` for the exported GGUF: FROM (+ ADAPTER), a TEMPLATE that renders
exactly what the training renderer renders, a PARAMETER stop per stop string and
end-of-turn token, and the sampler's decoding defaults.

Ollama templates are Go `text/template`, the training template is Jinja: no general
translation exists. So the template is *measured* instead: the renderer renders probe
conversations with marker contents, and the text between the markers gives the pieces
(before the first user turn without / with a system prompt, between a user turn and the
assistant's, between an assistant turn and the next user's, the generation prompt). The
Go template is built from those pieces only, and `render_pieces` (the same logic in
Python) must reproduce the renderer on the template-parity conversations, else no TEMPLATE
is written (Ollama then falls back to the GGUF's `tokenizer.chat_template`) and the file
says why. Ollama itself is not run here; the pieces are checked, the Go syntax is simple.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lora_alpaca.chat_template import ChatRenderer, TemplateRenderError

NAME = "Modelfile"
ADAPTER_NAME = "Modelfile.adapter"
_S, _U1, _A1, _U2 = "Qz7sys", "Qz7usr1", "Qz7ast1", "Qz7usr2"


@dataclass(frozen=True)
class Pieces:
    first: str  # before the first user turn, no system prompt (the template's default)
    system_before: str | None  # before the system prompt (None: the template has no system)
    system_after: str
    to_assistant: str  # after a user turn, before the assistant's answer (= generation prompt)
    to_user: str  # after an assistant turn, before the next user turn


def _prompt(renderer: ChatRenderer, messages: list[dict]) -> str:
    # As Ollama will tokenize it: the runtime adds BOS itself when the GGUF says add_bos.
    return renderer.prompt_text(messages)


def _split(text: str, *markers: str) -> list[str]:
    parts = []
    for m in markers:
        if text.count(m) != 1:
            raise ValueError(m)
        before, text = text.split(m)
        parts.append(before)
    return parts + [text]


def measure(renderer: ChatRenderer) -> Pieces | None:
    """The pieces, or None when the template is not of this shape (checked by re-rendering)."""
    u1, a1, u2 = (
        {"role": r, "content": c} for r, c in (("user", _U1), ("assistant", _A1), ("user", _U2))
    )
    try:
        first, to_asst, to_user, gen = _split(_prompt(renderer, [u1, a1, u2]), _U1, _A1, _U2)
        try:
            sys_before, sys_after, _ = _split(
                _prompt(renderer, [{"role": "system", "content": _S}, u1]), _S, _U1
            )
        except TemplateRenderError:
            sys_before, sys_after = None, ""
    except (TemplateRenderError, ValueError):
        return None
    if gen != to_asst:
        return None
    pieces = Pieces(first, sys_before, sys_after, to_asst, to_user)
    from lora_alpaca.export.template_parity import CONVERSATIONS

    for msgs in CONVERSATIONS + [[u1, a1, u2]]:
        try:
            want = _prompt(renderer, msgs)
        except TemplateRenderError:
            continue
        if render_pieces(pieces, msgs) != want:
            return None
    return pieces


def render_pieces(p: Pieces, messages: list[dict]) -> str:
    """What the Go template below renders for `messages` (ending with a user turn)."""
    out, seen_user = [], False
    has_system = bool(messages) and messages[0]["role"] == "system"
    for m in messages:
        if m["role"] == "system":
            if p.system_before is not None:  # a template without a system role: dropped
                out += [p.system_before, m["content"], p.system_after]
        elif m["role"] == "user":
            if not seen_user and not (has_system and p.system_before is not None):
                out.append(p.first)
            elif seen_user:
                out.append(p.to_user)
            out.append(m["content"])
            seen_user = True
        else:
            out += [p.to_assistant, m["content"]]
    if messages and messages[-1]["role"] == "user":
        out.append(p.to_assistant)
    return "".join(out)


def _go(text: str) -> str:
    # A JSON string is a valid Go interpreted string literal (\n, \", \uXXXX escapes);
    # every literal goes through an action, so Go's {{- -}} trimming never touches it.
    return "{{ " + json.dumps(text, ensure_ascii=True) + " }}" if text else ""


def go_template(p: Pieces) -> str:
    system = "{{- if eq $m.Role \"system\" }}" + (
        _go(p.system_before) + "{{ $m.Content }}" + _go(p.system_after) + "{{- $sys = true }}"
        if p.system_before is not None
        else ""
    ) + "{{- else if eq $m.Role \"user\" }}"  # fmt: skip
    return (
        "{{- $sys := false }}{{- $seen := false }}"
        "{{- range $i, $m := .Messages }}" + system + "{{- if $seen }}" + _go(p.to_user)
        + "{{- else if not $sys }}" + _go(p.first) + "{{- end }}"
        "{{- $m.Content }}{{- $seen = true }}"
        "{{- if eq (len (slice $.Messages $i)) 1 }}" + _go(p.to_assistant) + "{{- end }}"
        "{{- else if eq $m.Role \"assistant\" }}" + _go(p.to_assistant) + "{{- $m.Content }}"
        "{{- end }}{{- end }}"
    )  # fmt: skip


def _quote(text: str) -> str:
    # Ollama's Modelfile parser (parser/parser.go `unquote`) strips the quotes and decodes
    # no escapes; a quoted value may span lines. So the text goes in raw ("\n### " holds a
    # real newline); triple quotes when it holds a quote itself.
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def stop_parameters(text: str) -> list[str]:
    """The PARAMETER stop values of a Modelfile written by `modelfile` (double-quoted)."""
    import re

    return re.findall(r'^PARAMETER stop "(.*?)"$', text, re.M | re.S)


def modelfile(renderer: ChatRenderer, from_file: str, adapter_file: str | None = None) -> str:
    """The Modelfile text; `from_file`/`adapter_file` are paths relative to the Modelfile."""
    from lora_alpaca.generate.engine import DecodingSettings

    d = DecodingSettings()  # the sampler's own defaults (generate.py), one source of truth
    lines = [
        "# Ollama: ollama create NAME -f " + (ADAPTER_NAME if adapter_file else NAME),
        f"FROM ./{from_file}",
    ]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    pieces = measure(renderer)
    if pieces is None:
        lines.append(
            "# No TEMPLATE: this chat template is not of a shape a Go template built from its "
            "pieces reproduces exactly; Ollama uses the GGUF's tokenizer.chat_template."
        )
    else:
        lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    for stop in renderer.stop_strings:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines += [
        f"PARAMETER temperature {d.temperature}",
        f"PARAMETER top_p {d.top_p}",
        f"PARAMETER top_k {d.top_k}",
        f"PARAMETER repeat_penalty {d.repetition_penalty}",
        f"PARAMETER num_predict {d.max_new_tokens}",
    ]
    return "\n".join(lines) + "\n"
