"""The model ids one server answers: each --lora_weights folder (id = its folder name) and
`base` (the adapter switched off), all on one copy of the base weights (peft multi-adapter:
`load_adapter(adapter_name=...)`, `set_adapter`, `disable_adapter`)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.prompts import PromptTemplate, load_template

BASE_ID = "base"


@dataclass(frozen=True)
class ModelEntry:
    model_id: str
    adapter_name: str | None  # peft adapter name; None = base (adapter off) or merged model
    template: PromptTemplate
    renderer: object  # lora_alpaca.chat_template.ChatRenderer: chat requests render through it


@dataclass
class ServedModels:
    model: object
    tokenizer: object
    device: object
    entries: dict[str, ModelEntry]
    description: str
    context_len: int
    eos_ids: list[int]  # the generator's, computed once at load (every batch uses them)
    watermark_processor: object = None  # set by serve() with --watermark

    @property
    def has_adapters(self) -> bool:
        return any(e.adapter_name is not None for e in self.entries.values())


def model_ids_for(lora_weights: list[str] | None) -> list[str]:
    """Checked before loading: ids must be unique and `base` stays the base."""
    ids = [Path(p).resolve().name for p in lora_weights or []]
    for p, i in zip(lora_weights or [], ids, strict=True):
        if i == BASE_ID:
            raise UsageError(
                f"--lora_weights {p}: folder name 'base' is the base model's id; rename it"
            )
        if ids.count(i) > 1:
            raise UsageError(
                f"--lora_weights {p}: two adapters named {i!r} (the model id is the folder name)"
            )
    return ids


def _context_len(gen) -> int:
    n = gen.context_len()
    tok_max = getattr(gen.tokenizer, "model_max_length", None)
    if not n and tok_max and tok_max < 1_000_000:
        n = tok_max
    return int(n or 2048)


def load_served(cfg) -> ServedModels:
    """Load the base (+ first adapter) the way generate.py always does, then the others."""
    from lora_alpaca.chat_template import renderer_from_manifest
    from lora_alpaca.generate.app import chat_renderer_for, request_of
    from lora_alpaca.generate.loading import load_generator
    from lora_alpaca.runfolder import (
        check_adapter_files,
        check_base_fingerprint,
        read_manifest,
        template_from_manifest,
    )

    paths = list(cfg.lora_weights or [])
    ids = model_ids_for(paths)
    loaded = load_generator(request_of(cfg))  # with --api: the first adapter (paths[0])
    gen = loaded.generator
    # The sampler's rule (generate.app.chat_renderer_for): the loaded adapter's training
    # renderer, which `base` (adapter off) shares as the page's side-by-side does; without an
    # adapter the tokenizer's own chat template, else the alpaca form of the prompt template.
    first_renderer = chat_renderer_for(loaded)[0]
    entries = {BASE_ID: ModelEntry(BASE_ID, None, gen.template, first_renderer)}
    if paths:
        # load_generator named the first adapter "default"; keep peft's name for it.
        entries[ids[0]] = ModelEntry(ids[0], "default", gen.template, first_renderer)
        base_config = gen.model.get_base_model().config
        for n, (path, model_id) in enumerate(zip(paths[1:], ids[1:], strict=True), 1):
            manifest = read_manifest(path)
            check_adapter_files(Path(path), cfg.allow_pickle_adapter, "--allow_pickle_adapter")
            check_base_fingerprint(manifest, base_config, cfg.base_model or ids[0])
            name = f"adapter{n}"  # peft adapter names become module keys: no dots allowed
            try:
                gen.model.load_adapter(path, adapter_name=name, is_trainable=False)
            except pickle.UnpicklingError:
                raise UsageError(
                    f"--lora_weights {path}: adapter_model.bin holds objects other than tensors"
                ) from None
            template = (
                load_template(cfg.prompt_template_name)
                if cfg.prompt_template_name
                else template_from_manifest(manifest)
            )
            renderer = renderer_from_manifest(manifest, gen.tokenizer)
            entries[model_id] = ModelEntry(model_id, name, template, renderer)
    description = loaded.description + (
        f" (+{len(paths) - 1} more adapters)" if len(paths) > 1 else ""
    )
    return ServedModels(
        gen.model,
        gen.tokenizer,
        gen.device,
        entries,
        description,
        _context_len(gen),
        gen.eos_ids,
    )
