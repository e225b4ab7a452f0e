"""One source of truth per setting: the library's option objects are built from the command
configs' fields and agree with them on every default; tag lists come from field metadata."""

from __future__ import annotations

import dataclasses

from lora_alpaca.data import DataOptions
from lora_alpaca.generate import DecodingSettings
from lora_alpaca.generate.app import GenerateConfig
from lora_alpaca.train.config import LORA_KEYS, RESUME_KEYS, FinetuneConfig, validate


def defaults(cls) -> dict:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def test_data_options_defaults_match_finetune_flags():
    cli = defaults(FinetuneConfig)
    for name, value in defaults(DataOptions).items():
        assert cli[name] == value, name  # e.g. empty_outputs: both "skip"
    opts = DataOptions.from_config(FinetuneConfig(data="x.json", cutoff_len=77, seed=3))
    assert (opts.data, opts.cutoff_len, opts.seed, opts.empty_outputs) == ("x.json", 77, 3, "skip")


def test_decoding_settings_defaults_match_generate_flags():
    cli = defaults(GenerateConfig)
    for name, value in defaults(DecodingSettings).items():
        assert cli[name] == value, name
    s = DecodingSettings.from_config(GenerateConfig(mode="sample", top_k=7, max_new_tokens=5))
    assert (s.mode, s.top_k, s.max_new_tokens, s.num_beams) == ("sample", 7, 5, 4)


def test_lora_and_resume_keys_come_from_field_tags():
    assert LORA_KEYS == (
        "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora"
    )  # fmt: skip
    assert set(LORA_KEYS) < set(RESUME_KEYS)
    assert {"base_model", "cutoff_len", "learning_rate", "seed", "packing"} < set(RESUME_KEYS)
    assert not {"output_dir", "save_steps", "logging_steps", "resume_from_checkpoint"} & set(
        RESUME_KEYS
    )


def test_normalisation_happens_at_construction_and_validate_only_checks():
    cfg = FinetuneConfig(data="x.json", lora_target_modules=["all_linear"], wandb_project="p")
    assert cfg.lora_target_modules == ["all-linear"] and cfg.report_to == "wandb"
    before = dataclasses.asdict(cfg)
    validate(cfg)
    assert dataclasses.asdict(cfg) == before


def test_parity_summary_names_the_adapters_own_quantization():
    from lora_alpaca.export.parity import summary_lines

    def report(q):
        cand = {"merge_base": "dequantized", "max_abs_logit_diff": 0.1, "top1_agreement": 1.0}
        return {
            "checks": [],
            "merge_base": {"quantization": q, "candidates": [cand], "better": "x"},
        }

    assert "vs the 8-bit adapter" in summary_lines(report("8bit"))[0]
    assert "vs the 4-bit adapter" in summary_lines(report("4bit"))[0]
