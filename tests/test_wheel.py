"""A non-editable install works away from the clone: build the wheel, install it into a fresh
venv, and run the three console commands from a folder outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT


def sh(*cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_wheel_installs_and_its_commands_run_from_anywhere(tiny_model, tmp_path):
    wheels = tmp_path / "wheels"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       ROOT, "-w", wheels, cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("lora_alpaca-*.whl")

    # A fresh venv without pip (fast, offline); the project's dependencies come from the
    # current environment through a .pth line, the project itself only from the wheel.
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    vpy = venv / "bin" / "python"
    site = subprocess.run(
        [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "-q", wheel,
       cwd=tmp_path)  # fmt: skip

    work = tmp_path / "elsewhere"  # not the clone: nothing there to import or read
    work.mkdir()
    env = {**os.environ, "LORA_ALPACA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = sh(vpy, "-c", "import lora_alpaca, lora_alpaca.prompts as p; "
               "print(lora_alpaca.__file__); print(p.available_templates())", cwd=work, env=env)  # fmt: skip
    first, templates = where.stdout.splitlines()
    assert str(venv) in first and str(ROOT) not in first
    assert "alpaca" in templates and "vigogne" in templates

    rows = [
        {"instruction": f"Say {w} {i}.", "input": "", "output": w} for i, w in enumerate("abcdefgh")
    ]
    (work / "rows.json").write_text(json.dumps(rows))
    sh("lora-alpaca-finetune", "--base_model", tiny_model, "--data", "rows.json",
       "--output_dir", "adapter", "--batch_size", "4", "--micro_batch_size", "2",
       "--max_steps", "2", "--val_set_size", "0", "--cutoff_len", "64", "--lora_r", "4",
       "--warmup_steps", "0", "--dtype", "fp32", "--prompt_template_name", "alpaca_short",
       cwd=work, env=env)  # fmt: skip
    assert (work / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((work / "adapter" / "lora_alpaca.json").read_text())
    assert manifest["template"]["name"] == "alpaca_short"

    gen = sh("lora-alpaca-generate", "--lora_weights", "adapter", "--prompt", "Say a.",
             "--max_new_tokens", "3", cwd=work, env=env)  # fmt: skip
    assert "ended by" in gen.stderr

    sh("lora-alpaca-export", "--lora_weights", "adapter", "--output_dir", "merged",
       "--dtype", "fp32", "--parity_prompts", "2", cwd=work, env=env)  # fmt: skip
    assert (work / "merged" / "config.json").is_file()
