"""export_hf_checkpoint.py: merged transformers folder, GGUF beside it, parity, bad inputs."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from adapters import make_adapter
from conftest import finetune as run_finetune
from conftest import run_cli, run_script
from safetensors.torch import load_file
from tiny import make_tiny_model

WORDS = ["apple", "river", "stone", "cloud", "violet", "candle", "harbor", "meadow"]


def export(*args) -> tuple[int, str, str]:
    """Run the CLI in-process (same click command and error mapping as the script)."""
    r = run_cli("export", *args)
    return r.returncode, r.stdout, r.stderr


def write_rows(path: Path, n: int = 40) -> Path:
    rows = [
        {
            "instruction": f"Repeat the word {WORDS[i % 8]} ({i}).",
            "input": "" if i % 2 else "twice",
            "output": f"{WORDS[i % 8]} {WORDS[i % 8]}",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def finetune(base: Path, out: Path, *extra: str) -> Path:
    """A real few-step training run with finetune.py (the adapter export is for)."""
    data = write_rows(out.parent / f"{out.name}-rows.json")
    r = run_finetune(
        "--base_model", base, "--data", data, "--output_dir", out, "--batch_size", "8",
        "--micro_batch_size", "4", "--max_steps", "3", "--val_set_size", "8",
        "--cutoff_len", "64", "--lora_r", "4", "--learning_rate", "2e-2", "--warmup_steps", "0",
        "--lora_dropout", "0", "--dtype", "fp32", "--lora_target_modules", "[q_proj,v_proj]",
        *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
    return finetune(tiny_model, tmp_path_factory.mktemp("ft") / "adapter")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """fp32 transformers export + q8_0 GGUF of the trained adapter, through the real script."""
    out = tmp_path_factory.mktemp("exp") / "merged"
    r = run_script(
        "export_hf_checkpoint.py",
        "--lora_weights",
        trained,
        "--output_dir",
        out,
        "--dtype",
        "fp32",
        "--gguf",
        "q8_0",
        "--parity_prompts",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity PASS transformers (fp32)" in r.stdout and "parity PASS gguf q8_0" in r.stdout, (
        r.stdout
    )
    return out


def test_merged_folder_loads_and_equals_adapter_logits(exported, trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, trained).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok(["### Instruction:\nRepeat the word apple.\n\n### Response:\n"], return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), reference.disable_adapter():  # the adapter matters: base alone differs
        assert (reference(input_ids=ids).logits - want).abs().max() > 1e-3


def test_merge_changed_targeted_weights_and_nothing_else(exported, tiny_model):
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    assert set(after) == set(before)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"
    )


def test_export_folder_contents(exported, trained):
    from transformers import GenerationConfig

    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "parity.json",
        "export.json",
        "model-q8_0.gguf",
    ):
        assert (exported / name).is_file(), name
    gen = GenerationConfig.from_pretrained(exported)
    manifest = json.loads((trained / "lora_alpaca.json").read_text())
    assert gen.eos_token_id == manifest["special_tokens"]["eos_token_id"]
    assert gen.pad_token_id == manifest["special_tokens"]["pad_token_id"]
    # Stop strings stay out of generation_config.json (they would break plain generate());
    # the merged folder's export.json and model card carry them.
    assert getattr(gen, "stop_strings", None) is None
    record = json.loads((exported / "export.json").read_text())
    assert record["template"]["stop_strings"] == manifest["stop_strings"]
    assert "### Instruction:" in record["template"]["stop_strings"]
    assert "### Instruction:" in (exported / "README.md").read_text()
    card = (exported / "README.md").read_text()
    run = json.loads((trained / "run.json").read_text())
    assert manifest["base_model"]["name"] in card
    assert "alpaca" in card and run["data"]["path"] in card
    # The LoRA settings come from the manifest (lora_r / lora_target_modules).
    assert "(r=4, targets q_proj, v_proj)" in card, card
    report = json.loads((exported / "parity.json").read_text())
    assert report["passed"] and len(report["prompts"]) == 4
    # held-out prompts come from the training data named in run.json, in the adapter's template
    assert all("Repeat the word" in p and p.endswith("### Response:\n") for p in report["prompts"])
    for path in [exported, *exported.iterdir()]:
        assert not path.stat().st_mode & stat.S_IWOTH, path
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_merged_folder_works_with_plain_transformers_readers(exported):
    """The most common calls, unchanged: AutoModel + generate(**tokenizer(...)) without
    `tokenizer=`, pipeline("text-generation"), and GenerationConfig.from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    out = model.generate(
        **tok("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt"), max_new_tokens=3
    )
    assert out.shape[1] > 0
    pipe = pipeline("text-generation", model=str(exported), tokenizer=str(exported), device="cpu")
    text = pipe("### Instruction:\nSay hi.\n\n### Response:\n", max_new_tokens=3)[0][
        "generated_text"
    ]
    assert text.startswith("### Instruction:")
    assert GenerationConfig.from_pretrained(exported).eos_token_id is not None


def test_parity_only_rechecks_and_fails_on_tampered_weights(exported, trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    code, out, _ = export(
        "--lora_weights", trained, "--output_dir", copy, "--parity_only", "--parity_prompts", "2"
    )
    assert code == 0 and "parity PASS transformers (fp32)" in out
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.1.self_attn.v_proj.weight"] += (
        0.05  # a model that no longer says what the adapter said
    )
    from safetensors.torch import save_file

    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    code, out, _ = export(
        "--lora_weights", trained, "--output_dir", copy, "--parity_only", "--parity_prompts", "2"
    )
    assert code == 1 and "parity FAIL transformers (fp32)" in out
    assert json.loads((copy / "parity.json").read_text())["passed"] is False


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_exports_pass_parity(tiny_model, tmp_path, dtype):
    adapter = make_adapter(tiny_model, tmp_path / "ad")
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o",
        "--dtype",
        dtype,
        "--parity_prompts",
        "3",
    )
    assert code == 0, err + out
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]


def test_gguf_only_and_sharding(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "ad")
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "g",
        "--gguf",
        "f16",
        "--gguf_only",
        "--parity_prompts",
        "2",
    )
    assert code == 0, err + out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "Modelfile",  # Ollama's, beside every GGUF export
        "README.md",
        "export.json",
        "model-f16.gguf",
        "parity.json",
    ]
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "s",
        "--dtype",
        "fp32",
        "--max_shard_size",
        "200KB",
        "--parity_prompts",
        "2",
    )
    assert code == 0, err + out
    assert len(list((tmp_path / "s").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_export(tmp_path, arch):
    base = make_tiny_model(tmp_path / arch, arch=arch)
    adapter = make_adapter(base, tmp_path / "ad", target_modules=("q_proj", "v_proj", "down_proj"))
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o",
        "--dtype",
        "fp32",
        "--parity_prompts",
        "2",
    )
    assert code == 0, err + out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_type"] == arch


def test_tied_embeddings_export(tmp_path):
    base = make_tiny_model(tmp_path / "tied", tie=True)
    adapter = make_adapter(base, tmp_path / "ad", target_modules=("q_proj", "v_proj", "o_proj"))
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o",
        "--dtype",
        "fp32",
        "--gguf",
        "f16",
        "--parity_prompts",
        "3",
    )
    assert code == 0, err + out
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tmp_path / "o" / "model.safetensors"))
    assert "parity PASS gguf f16" in out


def test_4bit_adapter_merge_base_comparison(tiny_model, tmp_path):
    """An adapter trained on an nf4 base: the dequantized merge reproduces it, the original
    weights only approximately; both are measured and the better one is named."""
    adapter = make_adapter(tiny_model, tmp_path / "q4", scale=0.1)
    manifest = json.loads((adapter / "lora_alpaca.json").read_text())
    manifest["quantization"] = "4bit"  # as finetune.py --quantization 4bit records it
    (adapter / "lora_alpaca.json").write_text(json.dumps(manifest))
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o",
        "--dtype",
        "fp32",
        "--parity_prompts",
        "3",
    )
    assert code == 0, err + out
    report = json.loads((tmp_path / "o" / "parity.json").read_text())
    mb = report["merge_base"]
    assert mb["exported"] == "dequantized" and mb["better"] == "dequantized"
    diffs = {c["merge_base"]: c["max_abs_logit_diff"] for c in mb["candidates"]}
    # (bitsandbytes' CPU 4-bit matmul itself rounds, so "reproduces" is ~1e-3, not 1e-6)
    assert diffs["dequantized"] * 5 < diffs["original"], diffs
    assert "dequantized matches the adapter's outputs better" in out
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o2",
        "--dtype",
        "fp32",
        "--merge_base",
        "original",
        "--parity_prompts",
        "2",
    )
    assert code == 0, err + out
    merged_orig = load_file(str(tmp_path / "o2" / "model.safetensors"))
    merged_deq = load_file(str(tmp_path / "o" / "model.safetensors"))
    untouched = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: original vs nf4 round trip
    assert torch.equal(
        merged_orig[untouched], load_file(str(tiny_model / "model.safetensors"))[untouched]
    )
    assert not torch.equal(merged_deq[untouched], merged_orig[untouched])


def bad_input_cases(tiny_model: Path, tmp: Path):
    adapter = make_adapter(tiny_model, tmp / "ad")
    other = make_tiny_model(tmp / "other", arch="mistral")
    qwen = make_tiny_model(tmp / "qwen", arch="qwen2")
    qwen_adapter = make_adapter(qwen, tmp / "qwen-ad")
    full = tmp / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    # adapter_model.bin without --allow_pickle: the story is told once, in test_security.py
    return [
        (
            ["--lora_weights", tmp / "missing", "--output_dir", tmp / "o1"],
            "--lora_weights: no such folder",
        ),
        (
            ["--lora_weights", adapter, "--output_dir", tmp / "o2", "--base_model", other],
            "adapter was trained on",
        ),
        (["--lora_weights", adapter, "--output_dir", full], "folder exists and is not empty"),
        (
            ["--lora_weights", qwen_adapter, "--output_dir", tmp / "o3", "--gguf", "q8_0"],
            "architecture 'qwen2' is not supported",
        ),
        (
            ["--lora_weights", adapter, "--output_dir", tmp / "o5", "--gguf_only"],
            "--gguf_only: also pass --gguf",
        ),
        (
            ["--lora_weights", adapter, "--output_dir", tmp / "o6", "--merge_base", "dequantized"],
            "nothing to dequantize",
        ),
        (
            ["--lora_weights", adapter, "--output_dir", tmp / "o7", "--gguf", "q4_k"],
            "--gguf 'q4_k': 'q4_k' is not a GGUF type; allowed: none, or one or several",
        ),
        (["--lora_weights", adapter], "--output_dir is required"),
        (
            ["--lora_weights", adapter, "--output_dir", tmp / "o8", "--max_shard_size", "big"],
            "not a size",
        ),
    ]


def test_bad_inputs_one_line_exit_2_nothing_written(tiny_model, tmp_path):
    cases = bad_input_cases(tiny_model, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        code, out, err = export(*args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output or temp folder created
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # and as a real process: no traceback, exit code 2
    r = run_script("export_hf_checkpoint.py", *cases[1][0])
    assert r.returncode == 2 and "Traceback" not in r.stderr and cases[1][1] in r.stderr


@pytest.mark.slow
def test_smollm2_merge_passes_parity(quickstart_run, tmp_path):
    """The real SmolLM2-135M after the README Quickstart fine-tune: bf16 transformers export
    and q8_0 GGUF pass parity."""
    adapter = quickstart_run
    code, out, err = export(
        "--lora_weights",
        adapter,
        "--output_dir",
        tmp_path / "o",
        "--gguf",
        "q8_0",
        "--parity_prompts",
        "4",
    )
    assert code == 0, err + out
    report = json.loads((tmp_path / "o" / "parity.json").read_text())
    targets = [c["target"] for c in report["checks"] if c["passed"]]
    assert targets == [
        "chat template (training renderer / tokenizer / GGUF)",
        "transformers (bf16)",
        "transformers tokenizer",
        "gguf q8_0",
        "gguf q8_0 tokenizer",
    ]
    transformers_check = next(c for c in report["checks"] if c["target"] == "transformers (bf16)")
    assert transformers_check["top1_agreement"] > 0.97


def test_parity_prompt_sources(tmp_path, alpaca_json):
    from lora_alpaca.export.parity import BUILTIN_PROMPTS, parity_prompts
    from lora_alpaca.prompts import load_template

    template = load_template("alpaca")
    held_out = [
        {"instruction": "Held out one.", "input": ""},
        {"instruction": "Held out two.", "input": "x"},
    ]
    run = {"data": {"val_sample": held_out, "path": str(alpaca_json)}}
    assert sorted(parity_prompts(template, run, 2)) == sorted(
        [template.build_prompt("Held out one."), template.build_prompt("Held out two.", "x")]
    )
    rows = json.loads(alpaca_json.read_text())  # too few held-out rows: the real data file
    known = {template.build_prompt(r["instruction"], r["input"]) for r in rows}
    prompts = parity_prompts(template, run, 5)
    assert len(set(prompts)) == 5 and set(prompts) <= known
    assert parity_prompts(template, None, 3) == [
        template.build_prompt(*r) for r in BUILTIN_PROMPTS[:3]
    ]
