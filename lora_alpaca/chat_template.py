"""THE chat renderer: one object renders conversations for training, generation, the chat
page, the OpenAI-compatible server and every exported artifact.

API (kept stable for the server and the sampler):

    renderer = build_renderer(tokenizer, spec, prompt_template)   # spec: base | alpaca | PATH.jinja
    renderer = renderer_from_manifest(manifest, tokenizer)        # what an adapter was trained with
    renderer.render(messages, add_generation_prompt=True) -> str  # messages: [{role, content}]
    renderer.encode(messages, train_on_turns="all", train_on_inputs=False) -> (input_ids, labels)
    renderer.prompt_ids(messages) -> list[int]                    # ids to feed generate()
    renderer.jinja_source       # saved as the tokenizer's chat_template and GGUF tokenizer.chat_template
    renderer.eog_token_ids      # end-of-generation ids (EOS + the template's end-of-turn token)
    renderer.stop_strings       # text stops for samplers (the template's headers for `alpaca`)
    renderer.to_manifest()      # the dict recorded in lora_alpaca.json

Masking is exact: the conversation is rendered prefix by prefix (up to each assistant turn
with the generation prompt, and through it), each prefix is tokenized, and its ids are
compared with the ids of the whole conversation; an assistant turn's learned tokens are the
ids between those two boundaries, cut after its last end-of-turn id. No header string is
ever searched for in the text. A template that rewrites earlier turns when more follow
(so a prefix is not a prefix of the whole) is refused rather than masked by guesswork.

The `alpaca` spec is a multi-turn form of a project Alpaca template: a single user turn
renders to exactly `prompt_no_input` (with the BOS the Alpaca encoder adds), each assistant
turn is its content + EOS, later user turns repeat the instruction header, and a system
message replaces the template's preamble.

Rendering uses jinja2 with the settings transformers' `apply_chat_template` uses
(sandboxed, trim_blocks, lstrip_blocks, loopcontrols, raise_exception), so the saved
tokenizer renders the same string; the parity check in export proves it by token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from lora_alpaca.constants import IGNORE_INDEX
from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import expand_user
from lora_alpaca.prompts import PromptTemplate

ROLES = ("system", "user", "assistant")
SPECS_HELP = "base (the tokenizer's own chat template), alpaca, or a path to a .jinja file"


class TemplateRenderError(ValueError):
    """The template refused a conversation (its raise_exception) or cannot mask it exactly."""


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateRenderError(str(message))

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(
            f"--chat_template: not a valid Jinja template (line {e.lineno}: {e.message})"
        ) from None


def _lit(text: str) -> str:
    # json.dumps gives a double-quoted literal whose escapes Jinja decodes the same way.
    return json.dumps(text)


def alpaca_jinja(template: PromptTemplate, with_bos: bool) -> str:
    """The multi-turn Jinja form of an Alpaca template (see the module docstring)."""
    before, after = template.prompt_no_input.split("{instruction}", 1)
    before = before.replace("{{", "{").replace("}}", "}")
    after = after.replace("{{", "{").replace("}}", "}")
    cut = before.rfind("\n\n")
    preamble, header = (before[:cut], before[cut + 2 :]) if cut != -1 else ("", before)
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns = namespace(pre=messages[0]['content'], rest=messages[1:], last='') -%}"
        "{%- else -%}"
        f"{{%- set ns = namespace(pre={_lit(preamble)}, rest=messages, last='') -%}}"
        "{%- endif -%}"
        + ("{{- bos_token -}}" if with_bos else "")
        + "{%- for message in ns.rest -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if ns.last == 'user' -%}"
        "{{- raise_exception('two user turns in a row: this template has no way to show them') -}}"
        "{%- endif -%}"
        "{%- if loop.first -%}"
        "{%- if ns.pre -%}{{- ns.pre + " + _lit("\n\n") + " -}}{%- endif -%}"
        "{%- else -%}{{- " + _lit("\n\n") + " -}}{%- endif -%}"
        "{{- " + _lit(header) + " + message['content'] -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- if ns.last != 'user' -%}"
        "{{- raise_exception('an assistant turn must follow a user turn') -}}"
        "{%- endif -%}"
        "{{- " + _lit(after) + " + message['content'] + eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('role ' + message['role'] + ' is allowed only as the first message (system)') -}}"
        "{%- endif -%}"
        "{%- set ns.last = message['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and ns.last == 'user' -%}{{- "
        + _lit(after)
        + " -}}{%- endif -%}"
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Rendered:
    """A conversation's ids and, per assistant turn, [start, end) of its learned ids."""

    ids: list[int]
    spans: list[tuple[int, int, int]]  # (start, end, message index)


class ChatRenderer:
    def __init__(self, tokenizer, jinja_source: str, spec: str, stop_strings=()):
        self.tokenizer, self.jinja_source, self.spec = tokenizer, jinja_source, spec
        self._template = _compile(jinja_source)
        specials = {
            "bos_token": tokenizer.bos_token or "",
            "eos_token": tokenizer.eos_token or "",
            "pad_token": tokenizer.pad_token or "",
            "unk_token": tokenizer.unk_token or "",
        }
        self._specials = specials
        self.eog_token_ids = self._find_eog_ids()
        texts = [tokenizer.convert_ids_to_tokens(i) for i in self.eog_token_ids if i is not None]
        self.stop_strings = tuple(dict.fromkeys([*texts, *stop_strings]))

    # ---- rendering ---------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text; TemplateRenderError when the template refuses it."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return self._template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, **self._specials
            )
        except TemplateRenderError:
            raise
        except Exception as e:  # noqa: BLE001 - a template's own errors come in many types
            raise TemplateRenderError(f"{type(e).__name__}: {e}") from None

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # As apply_chat_template(tokenize=True): the template writes the special tokens.
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def prompt_text(self, messages: list[dict]) -> str:
        """The conversation up to the assistant's turn, as text for a tokenizer call that adds
        its own special ids (the sampler, the batch CLI and the API server all encode that
        way): a BOS the template writes as text is dropped, so the model never sees two."""
        from lora_alpaca.data.tokenize import bos_prefix

        text = self.render(messages, add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and bos_prefix(self.tokenizer):
            text = text[len(bos) :]
        return text

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._ids([self.render(messages, add_generation_prompt=True)])[0]

    def rendered(self, messages: list[dict]) -> Rendered:
        """Ids of the whole conversation and the exact span of every assistant turn."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        texts = [self.render(messages, add_generation_prompt=False)]
        for i in turns:
            texts.append(self.render(messages[:i], add_generation_prompt=True))
            texts.append(self.render(messages[: i + 1], add_generation_prompt=False))
        ids = self._ids(texts)
        full = ids[0]
        eog = set(self.eog_token_ids)
        spans = []
        for k, i in enumerate(turns):
            before, through = ids[1 + 2 * k], ids[2 + 2 * k]
            start = _common_prefix(before, full)
            end = _common_prefix(through, full)
            # One token of slack: BPE may merge the last prompt token with the first
            # answer token; more means the template rewrote earlier turns.
            if len(before) - start > 1 or len(through) - end > 1 or end <= start:
                raise TemplateRenderError(
                    f"turn {i + 1}: the template does not render this conversation "
                    "incrementally (earlier turns change when later ones follow), so its "
                    "assistant tokens cannot be masked exactly"
                )
            last_eog = max((j for j in range(start, end) if full[j] in eog), default=None)
            spans.append((start, last_eog + 1 if last_eog is not None else end, i))
        return Rendered(full, spans)

    def encode(
        self, messages: list[dict], train_on_turns: str = "all", train_on_inputs: bool = False
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels): assistant tokens and their end-of-turn learned, all else -100
        (train_on_turns=last: only the final assistant turn; train_on_inputs: every token)."""
        r = self.rendered(messages)
        return r.ids, labels_for(r, train_on_turns, train_on_inputs)

    # ---- end of generation -----------------------------------------------------------
    def _find_eog_ids(self) -> list[int]:
        """EOS plus the special tokens that close an assistant turn in this template."""
        tok = self.tokenizer
        out = [tok.eos_token_id] if tok.eos_token_id is not None else []
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
        try:
            before, through = self._ids([self.render(probe[:1], True), self.render(probe, False)])
        except TemplateRenderError:
            return out
        special = set(tok.all_special_ids) | {
            i for i, t in tok.added_tokens_decoder.items() if t.special
        }
        start = _common_prefix(before, through)
        for i in through[start:]:
            if i in special and i not in out:
                out.append(i)
                break  # the first special after the answer closes the turn
        return out

    def to_manifest(self) -> dict:
        return {
            "spec": self.spec,
            "jinja": self.jinja_source,
            "eog_token_ids": list(self.eog_token_ids),
            "stop_strings": list(self.stop_strings),
        }


def labels_for(r: Rendered, train_on_turns: str, train_on_inputs: bool) -> list[int]:
    if train_on_inputs:
        return list(r.ids)
    labels = [IGNORE_INDEX] * len(r.ids)
    spans = r.spans[-1:] if train_on_turns == "last" else r.spans
    for start, end, _ in spans:
        labels[start:end] = r.ids[start:end]
    return labels


def build_renderer(tokenizer, spec: str, template: PromptTemplate) -> ChatRenderer:
    """base | alpaca | PATH.jinja -> the renderer; one-line UsageError otherwise."""
    if spec == "alpaca":
        from lora_alpaca.data.tokenize import bos_prefix

        source = alpaca_jinja(template, with_bos=bool(bos_prefix(tokenizer)))
        return ChatRenderer(tokenizer, source, f"alpaca:{template.name}", template.stop_strings)
    if spec == "base":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default")
        if not source:
            raise UsageError(
                "--chat_template base: the base model's tokenizer has no chat template; "
                "use --chat_template alpaca or a path to a .jinja file"
            )
        return ChatRenderer(tokenizer, source, "base")
    if spec.endswith(".jinja"):
        path = expand_user(spec)
        if not path.is_file():
            raise UsageError(f"--chat_template: no such template file {spec!r}")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--chat_template {spec}: not UTF-8 text") from None
        return ChatRenderer(tokenizer, source, str(path.resolve()))
    raise UsageError(f"--chat_template {spec!r}: choose {SPECS_HELP}")


def default_spec(tokenizer) -> str:
    """For conversation data: the base tokenizer's template when it has one, else alpaca."""
    return "base" if getattr(tokenizer, "chat_template", None) else "alpaca"


def renderer_from_manifest(manifest: dict, tokenizer) -> ChatRenderer:
    """The renderer an adapter was trained with (older manifests: the alpaca form of its
    prompt template, which renders exactly the prompt it was trained on)."""
    chat = manifest.get("chat_template")
    if chat:
        return ChatRenderer(tokenizer, chat["jinja"], chat["spec"], chat.get("stop_strings", ()))
    from lora_alpaca.runfolder import template_from_manifest

    return build_renderer(tokenizer, "alpaca", template_from_manifest(manifest))
