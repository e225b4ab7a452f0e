"""finetune.py end to end on tiny models: outputs, quantization, resume, DDP, bad flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from conftest import finetune as run_finetune
from safetensors.torch import load_file
from tiny import make_tiny_model

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "violet",
    "candle",
    "harbor",
    "meadow",
    "silver",
    "tiger",
]


def write_rows(path: Path, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        if i % 2:
            rows.append({"instruction": f"Repeat the word {i}.", "input": w, "output": f"{w} {w}"})
        else:
            rows.append(
                {
                    "instruction": f"Say the number {i} and the word {w}.",
                    "input": "",
                    "output": f"{i} {w}",
                }
            )
    path.write_text(json.dumps(rows, indent=2))
    return path


@pytest.fixture()
def rows_json(tmp_path) -> Path:
    return write_rows(tmp_path / "rows.json")


# Small, fast, deterministic settings shared by every run here (and the DDP comparison).
TINY_FLAGS = (
    "--batch_size 8 --micro_batch_size 2 --num_epochs 1 --val_set_size 8 --cutoff_len 96 "
    "--lora_r 4 --learning_rate 1e-2 --warmup_steps 0 --logging_steps 1 --eval_steps 2 "
    "--save_steps 2 --lora_dropout 0 --dtype fp32"
).split()


def finetune(base: Path, data: Path, out: Path, *extra: str, **kw):
    """conftest's runner with this file's settings; `in_process=True` for refusals."""
    return run_finetune(
        "--base_model", base, "--data", data, "--output_dir", out, *TINY_FLAGS, *extra, **kw
    )


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_end_to_end_outputs_and_plain_peft_reload(tiny_model, rows_json, tmp_path):
    out = tmp_path / "run"
    r = finetune(tiny_model, rows_json, out, "--lora_target_modules", "[q_proj,v_proj]")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "lora_alpaca.json",
        "run.json",
        "loss_curve.png",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 5  # 40 training rows // batch 8
    assert run["config"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert run["eval_history"][0]["step"] == 0 and run["final_eval_loss"] is not None
    manifest = json.loads((out / "lora_alpaca.json").read_text())
    assert (
        manifest["template"]["name"] == "alpaca" and "### Instruction:" in manifest["stop_strings"]
    )
    assert "adapter verified" in r.stderr
    # Plain PEFT, no project code: the adapter changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(model(ids).logits, before)
    assert len([k for k in adapter(out) if "lora_B" in k]) == 4  # 2 layers x q,v
    assert oct((out / "adapter_model.safetensors").stat().st_mode)[-3:] in ("644", "640", "600")


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_training_runs_on_cpu(tiny_model, rows_json, tmp_path, quantization):
    out = tmp_path / quantization
    r = finetune(tiny_model, rows_json, out, "--quantization", quantization, "--max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "lora_alpaca.json").read_text())["quantization"] == quantization
    assert any(v.abs().sum() > 0 for k, v in adapter(out).items() if "lora_B" in k)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(tmp_path, rows_json, arch):
    base = make_tiny_model(tmp_path / arch, arch=arch, tie=arch == "qwen2")
    out = tmp_path / "out"
    r = finetune(base, rows_json, out, "--max_steps", "2", "--lora_target_modules", "all-linear")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "lora_alpaca.json").read_text())["base_model"]["model_type"] == arch


def test_interrupt_then_resume_equals_uninterrupted(tiny_model, rows_json, tmp_path):
    full = tmp_path / "full"
    assert finetune(tiny_model, rows_json, full, "--num_epochs", "2").returncode == 0
    part = tmp_path / "part"
    r = finetune(
        tiny_model, rows_json, part, "--num_epochs", "2", env={"LORA_ALPACA_FAULT_SIGNAL_STEP": "3"}
    )
    assert r.returncode == 143, r.stderr[-2000:]
    assert "resume with:" in r.stderr and "--resume_from_checkpoint auto" in r.stderr
    assert not (part / "lora_alpaca.json").exists()  # not mistaken for a finished run
    ckpts = sorted((part / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts][-1] == "checkpoint-00000003"
    # Re-running without --resume refuses to touch the folder.
    again = finetune(tiny_model, rows_json, part, "--num_epochs", "2", in_process=True)
    assert again.returncode == 2 and "resume_from_checkpoint auto" in again.stderr
    r = finetune(
        tiny_model, rows_json, part, "--num_epochs", "2", "--resume_from_checkpoint", "auto"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapter(full), adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert json.loads((part / "run.json").read_text())["steps"] == 10


def test_resume_with_changed_settings_is_refused(tiny_model, rows_json, tmp_path):
    out = tmp_path / "run"
    r = finetune(tiny_model, rows_json, out, env={"LORA_ALPACA_FAULT_SIGNAL_STEP": "2"})
    assert r.returncode == 143
    r = finetune(
        tiny_model, rows_json, out, "--resume_from_checkpoint", "auto", "--learning_rate", "5e-3",
        in_process=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert "learning_rate: 0.01 -> 0.005" in r.stderr and "--force_resume" in r.stderr


def test_nan_loss_stops_with_diagnosis_and_keeps_checkpoint(tiny_model, rows_json, tmp_path):
    out = tmp_path / "run"
    r = finetune(tiny_model, rows_json, out, env={"LORA_ALPACA_FAULT_NAN_STEP": "3"})
    assert r.returncode == 3
    assert "loss is nan at step 3" in r.stderr and "checkpoint-00000002" in r.stderr
    assert (out / "checkpoints" / "checkpoint-00000002" / "COMPLETE").is_file()


def test_ddp_two_processes_match_single_process(tiny_model, rows_json, tmp_path):
    single = tmp_path / "single"
    assert finetune(tiny_model, rows_json, single, "--max_steps", "3").returncode == 0
    ddp = tmp_path / "ddp"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "finetune.py"),
        "--base_model",
        str(tiny_model),
        "--data",
        str(rows_json),
        "--output_dir",
        str(ddp),
        *TINY_FLAGS,
        "--max_steps",
        "3",
    ]
    env = {**os.environ, "LORA_ALPACA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    a, b = adapter(single), adapter(ddp)
    # Equal up to fp32 reduction order: the all-reduce sums the two ranks' gradients in
    # another order than one process's micro-batch accumulation, and the matmul kernels block
    # a 2-row micro-batch differently from a 4-row one (on an AMX Xeon: 1.7e-5 on one of 256
    # elements after 3 AdamW steps). A wrong shard or a missing all-reduce moves the weights
    # by ~lr = 1e-2; the trained lora_B values must be far above the tolerance.
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_r", "0"], "--lora_r must be > 0"),
        (
            ["--batch_size", "10", "--micro_batch_size", "4"],
            "--batch_size 10 must be a multiple of --micro_batch_size 4",
        ),
        (["--lora_target_modules", "q_proj,nonexistent_proj"], "no module named nonexistent_proj"),
        (["--cutoff_len", "8"], "--cutoff_len 8 is shorter than the prompt template"),
        (["--prompt_template_name", "../../etc/passwd"], "unknown template"),
        (["--quantization", "3bit"], "Invalid value for '--quantization'"),
        (["--train_on_inputs", "maybe"], "'maybe' is not a boolean"),
        (["--resume_from_checkpoint", "auto", "--init_from_adapter", "x"], "conflict"),
        (["--nonsense_flag", "1"], "No such option"),
    ],
)
def test_bad_flags_one_line_exit_2(tiny_model, rows_json, tmp_path, flags, message):
    out = tmp_path / "out"
    r = finetune(tiny_model, rows_json, out, *flags, in_process=True)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_yaml_config_and_cli_override(tiny_model, rows_json, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "lora_alpha: 3\nseed: 7\nlearning_rate: 0.5\nlora_target_modules: [q_proj, k_proj]\n"
    )
    out = tmp_path / "run"
    r = finetune(
        tiny_model,
        rows_json,
        out,
        "--config",
        str(cfg),
        "--learning_rate",
        "0.001",
        "--max_steps",
        "1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    conf = json.loads((out / "run.json").read_text())["config"]
    assert conf["lora_alpha"] == 3 and conf["seed"] == 7 and conf["learning_rate"] == 0.001
    assert conf["lora_target_modules"] == ["q_proj", "k_proj"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 4\n")
    r = finetune(tiny_model, rows_json, tmp_path / "x", "--config", str(bad), in_process=True)
    assert r.returncode == 2 and "unknown key(s) lora_rank" in r.stderr


def test_output_dir_not_overwritten(tiny_model, rows_json, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    r = finetune(tiny_model, rows_json, out, in_process=True)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert (out / "precious.txt").read_text() == "mine"
    shutil.rmtree(out)


def test_init_from_adapter_is_a_warm_start(tiny_model, rows_json, tmp_path):
    first = tmp_path / "first"
    assert finetune(tiny_model, rows_json, first, "--max_steps", "3").returncode == 0
    second = tmp_path / "second"
    r = finetune(
        tiny_model, rows_json, second, "--max_steps", "1", "--init_from_adapter", str(first)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((first / "run.json").read_text())
    b = json.loads((second / "run.json").read_text())
    # Same validation rows: the warm start begins exactly where the first run ended...
    assert abs(b["eval_history"][0]["eval_loss"] - a["eval_history"][-1]["eval_loss"]) < 1e-5
    # ...but as a new run: its own step count, schedule and optimizer.
    assert b["steps"] == 1 and not (second / "checkpoints" / "checkpoint-00000003").exists()


def test_tensorboard_logging(tiny_model, rows_json, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="optional extra: pip install 'lora-alpaca[tensorboard]'"
    )
    out = tmp_path / "run"
    r = finetune(tiny_model, rows_json, out, "--max_steps", "2", "--report_to", "tensorboard")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
