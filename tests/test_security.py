"""Security defaults, each proved on real files and real processes.

- No pickle runs unless asked: base weights, adapters and checkpoints holding a live pickle
  payload (it creates a marker file when unpickled; a positive control shows it is live)
  are refused with one line, and the marker never appears. The code itself loads tensors
  only through safetensors or `torch.load(weights_only=True)`.
- `trust_remote_code` is off unless the flag turns it on: a model folder shipping Python
  code (it creates a marker on import) is refused by all three scripts; the code never runs.
- The sampler binds 127.0.0.1 by default and warns loudly when exposed (a real server on
  0.0.0.0 here; the loopback-only reachability and the server-side caps on prompt length,
  max_new_tokens and concurrency are proved against a live server in tests/test_ui.py).
- Template names cannot escape templates/ (property test over hostile names).
- Nothing the tools write is world-writable, even under `umask 000`.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from adapters import make_adapter
from conftest import ROOT, run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_alpaca.errors import UsageError

ROWS = [{"instruction": f"Say the number {i}.", "output": f"It is {i}."} for i in range(12)]


class Payload:
    """Unpickling this creates `marker`: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_err(script: str, *argv) -> tuple[int, str]:
    r = run_cli(script, *argv)
    return r.returncode, r.stderr


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def finetune_args(base, data, out) -> list:
    return ["--base_model", base, "--data", data, "--output_dir", out, "--batch_size", "4",
            "--micro_batch_size", "2", "--val_set_size", "0", "--cutoff_len", "64",
            "--max_steps", "2", "--save_steps", "1", "--dtype", "fp32"]  # fmt: skip


@pytest.fixture()
def data(tmp_path) -> Path:
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(ROWS))
    return p


# ---- no pickle unless asked -------------------------------------------------------------


def test_the_code_never_unpickles_without_weights_only():
    """Every torch.load in the project passes weights_only=True; no pickle/dill/joblib
    loads; trust_remote_code is never hard-wired on."""
    files = [*ROOT.glob("*.py"), *(ROOT / "lora_alpaca").rglob("*.py")]
    loads = 0
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", None)
                kw = {k.arg: k.value for k in node.keywords}
                if owner == "torch" and node.func.attr == "load":
                    loads += 1
                    wo = kw.get("weights_only")
                    assert isinstance(wo, ast.Constant) and wo.value is True, f"{f}:{node.lineno}"
                if owner in ("pickle", "dill", "joblib", "cloudpickle"):
                    assert node.func.attr not in ("load", "loads"), f"{f}:{node.lineno}"
                tr = kw.get("trust_remote_code")
                assert not (isinstance(tr, ast.Constant) and tr.value is True), f"{f}:{node.lineno}"
    assert loads >= 1  # the checkpoint loader: the scan sees real code


@pytest.fixture(scope="module")
def pickled_base(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """A copy of the tiny model whose only weights are a .bin holding a live payload."""
    root = tmp_path_factory.mktemp("pickled-base")
    d = root / "model"
    shutil.copytree(tiny_model, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    marker = root / "PWNED"
    torch.save({**state, "payload": Payload(marker)}, d / "pytorch_model.bin")
    return d, marker


def test_payload_is_live_positive_control(pickled_base):
    d, marker = pickled_base
    torch.load(d / "pytorch_model.bin", weights_only=False)  # what an unsafe loader does
    assert marker.exists()
    marker.unlink()


def test_pickled_base_weights_are_refused_by_every_script(
    pickled_base, tiny_model, data, tmp_path, monkeypatch
):
    d, marker = pickled_base
    monkeypatch.setenv("LORA_ALPACA_CACHE", str(tmp_path / "cache"))
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    code, err = code_err("finetune", *finetune_args(d, data, tmp_path / "o1"))
    assert_one_line(code, err, f"--base_model {d}", "other than tensors")
    code, err = code_err("generate", "--base_model", d, "--prompt", "hi")
    assert_one_line(code, err, f"--base_model {d}", "other than tensors")
    code, err = code_err("export", "--lora_weights", adapter, "--base_model", d,
                        "--output_dir", tmp_path / "o2")  # fmt: skip
    assert_one_line(code, err, "--allow_pickle")
    code, err = code_err("export", "--lora_weights", adapter, "--base_model", d,
                        "--allow_pickle", "--output_dir", tmp_path / "o2")  # fmt: skip
    assert_one_line(code, err, f"--base_model {d}", "other than tensors")
    assert not marker.exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_pickled_adapter_needs_the_flag_and_even_then_runs_no_code(tiny_model, tmp_path):
    """The whole adapter_model.bin story, told once: refused by generate and export without
    the flag, nothing written; with it a payload still cannot run; a plain .bin of tensors
    then loads and exports."""
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({**weights, "payload": Payload(marker)}, adapter / "adapter_model.bin")
    code, err = code_err("generate", "--lora_weights", adapter, "--prompt", "hi")
    assert_one_line(code, err, "--allow_pickle_adapter")
    code, err = code_err("export", "--lora_weights", adapter,
                        "--output_dir", tmp_path / "o")  # fmt: skip
    assert_one_line(code, err, "pass --allow_pickle")
    assert not marker.exists() and not (tmp_path / "o").exists()
    # Opting in still unpickles with weights_only=True (peft): the payload cannot run.
    code, err = code_err("generate", "--lora_weights", adapter, "--prompt", "hi",
                        "--max_new_tokens", "1", "--allow_pickle_adapter")  # fmt: skip
    assert_one_line(code, err, f"--lora_weights {adapter}", "other than tensors")
    code, err = code_err("export", "--lora_weights", adapter, "--allow_pickle",
                        "--output_dir", tmp_path / "o")  # fmt: skip
    assert_one_line(code, err, f"--lora_weights {adapter}", "other than tensors")
    # One opt-in name for both commands: each also takes the other's spelling.
    code, err = code_err("generate", "--lora_weights", adapter, "--prompt", "hi",
                        "--max_new_tokens", "1", "--allow_pickle")  # fmt: skip
    assert_one_line(code, err, f"--lora_weights {adapter}", "other than tensors")
    code, err = code_err("export", "--lora_weights", adapter, "--allow_pickle_adapter",
                        "--output_dir", tmp_path / "o")  # fmt: skip
    assert_one_line(code, err, f"--lora_weights {adapter}", "other than tensors")
    assert not marker.exists() and not (tmp_path / "o").exists()
    # A .bin of plain tensors, with the flag: loads and exports.
    torch.save(weights, adapter / "adapter_model.bin")
    r = run_cli("export", "--lora_weights", adapter, "--output_dir", tmp_path / "o",
                "--allow_pickle", "--dtype", "fp32", "--parity_prompts", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout


def test_tampered_checkpoint_is_refused_without_running_it(tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ALPACA_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "planted" / "checkpoint-00000001"
    ck.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(ck / "adapter_model.safetensors"))
    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [], "payload": Payload(marker)}, ck / "optimizer.pt")
    (ck / "COMPLETE").write_text("ok\n")
    code, err = code_err("finetune", *finetune_args(tiny_model, data, tmp_path / "o"),
                        "--resume_from_checkpoint", ck)  # fmt: skip
    assert_one_line(
        code, err, f"--resume_from_checkpoint {ck}", "optimizer.pt", "other than tensors"
    )
    assert not marker.exists() and not (tmp_path / "o").exists()


# ---- trust_remote_code ------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """The tiny model, declared as a custom architecture whose code creates a marker."""
    root = tmp_path_factory.mktemp("remote-code")
    d = root / "model"
    shutil.copytree(tiny_model, d)
    marker = root / "PWNED"
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="sneaky-llama",
               auto_map={"AutoConfig": "sneaky.SneakyConfig", "AutoModelForCausalLM": "sneaky.SneakyModel"})  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "sneaky.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class SneakyConfig(LlamaConfig):\n    model_type = 'sneaky-llama'\n"
        "class SneakyModel(LlamaForCausalLM):\n    config_class = SneakyConfig\n"
    )
    return d, marker


def test_remote_code_is_refused_by_every_script(
    remote_code_model, tiny_model, data, tmp_path, monkeypatch
):
    d, marker = remote_code_model
    monkeypatch.setenv("LORA_ALPACA_CACHE", str(tmp_path / "cache"))
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    cases = [
        ("finetune", finetune_args(d, data, tmp_path / "o1")),
        ("generate", ["--base_model", d, "--prompt", "hi"]),
        ("export", ["--lora_weights", adapter, "--base_model", d, "--output_dir", tmp_path / "o2"]),
    ]
    for script, argv in cases:
        code, err = code_err(script, *argv)
        assert_one_line(code, err, f"--base_model {d}", "--trust_remote_code")
    assert not marker.exists()
    # Positive control, in a child with its own module cache: the flag does run the code.
    probe = (
        "import sys; from lora_alpaca.models import BaseModelRef, load_config; "
        "load_config(BaseModelRef(sys.argv[1], sys.argv[1]), trust_remote_code=True)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    r = subprocess.run(
        [sys.executable, "-c", probe, str(d)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.exists()


def test_risky_switches_are_off_by_default():
    from lora_alpaca.generate.app import GenerateConfig
    from lora_alpaca.train.config import FinetuneConfig

    export_cfg = runpy.run_path(str(ROOT / "export_hf_checkpoint.py"))["ExportConfig"]
    for cfg in (FinetuneConfig(), GenerateConfig(), export_cfg()):
        assert cfg.trust_remote_code is False
    assert export_cfg().allow_pickle is False
    g = GenerateConfig()
    assert (g.server_name, g.share, g.allow_pickle_adapter) == ("127.0.0.1", False, False)
    assert (
        g.max_input_chars <= 10_000 and g.max_new_tokens_limit <= 4096 and g.concurrency_limit <= 4
    )


# ---- the sampler, exposed on purpose ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sampler_on_all_interfaces_warns_loudly(tiny_model, tmp_path):
    port = free_port()
    log = tmp_path / "sampler.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "generate.py"), "--base_model", str(tiny_model),
             "--server_name", "0.0.0.0", "--server_port", str(port), "--max_new_tokens", "4"],
            stdout=fh, stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        end = time.time() + 180
        while time.time() < end and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        assert "WARNING: listening on 0.0.0.0, not 127.0.0.1" in text, text[-3000:]
        assert "!" * 50 in text  # the banner around it
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- templates cannot escape templates/ ------------------------------------------------

SEGMENTS = [
    "..",
    ".",
    "templates",
    "alpaca",
    "etc",
    "passwd",
    "~",
    "",
    "%2e%2e",
    "\\",
    "\x00",
    "alpaca\n",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6),
    sep=st.sampled_from(["/", "\\", "//"]),
    lead=st.sampled_from(["", "/", "./", "~/"]),
)
@example(parts=["..", "..", "etc", "passwd"], sep="/", lead="")
@example(parts=["..", "templates", "alpaca"], sep="/", lead="")
@example(parts=["~", "\x00"], sep="\\", lead="")  # `~user` lookup of a NUL name: ValueError
def test_template_names_cannot_escape_templates(parts, sep, lead):
    from lora_alpaca.prompts import TEMPLATES_DIR, available_templates, load_template

    name = lead + sep.join(parts)
    try:
        t = load_template(name)
    except UsageError as e:
        assert "\n" not in str(e) and "--prompt_template_name" in str(e)
        return
    # Accepted only as one of the bundled names, read from templates/ itself.
    assert name in available_templates() and t.name == name
    assert (TEMPLATES_DIR / f"{name}.json").resolve().parent == TEMPLATES_DIR


# ---- nothing written is world-writable -------------------------------------------------


def world_writable(*roots: Path) -> list[str]:
    return [f"{oct(p.lstat().st_mode & 0o777)} {p}" for r in roots if r.exists()
            for p in [r, *r.rglob("*")] if not p.is_symlink() and p.lstat().st_mode & 0o002]  # fmt: skip


def test_nothing_written_is_world_writable_even_under_umask_000(tiny_model, data, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Say hi."}\n')
    cache = tmp_path / "cache"
    jobs = {
        "finetune": ["finetune.py", *finetune_args(tiny_model, data, tmp_path / "ft")],
        "generate": ["generate.py", "--lora_weights", adapter, "--input_file", prompts,
                     "--output_file", tmp_path / "gen" / "out.jsonl", "--max_new_tokens", "3"],
        "export": ["export_hf_checkpoint.py", "--lora_weights", adapter, "--output_dir",
                   tmp_path / "exp" / "merged", "--dtype", "fp32", "--parity_prompts", "2"],
    }  # fmt: skip
    (tmp_path / "gen").mkdir()

    def go(args):
        return subprocess.run(
            [sys.executable, str(ROOT / args[0]), *map(str, args[1:])],
            capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0),
            env={**os.environ, "LORA_ALPACA_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(jobs, pool.map(go, jobs.values()), strict=True))
    for name, r in results.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    assert (tmp_path / "ft" / "checkpoints").is_dir() and (tmp_path / "gen" / "out.jsonl").is_file()
    assert (tmp_path / "exp" / "merged" / "model.safetensors").is_file()
    bad = world_writable(tmp_path / "ft", tmp_path / "gen", tmp_path / "exp", cache)
    assert not bad, bad
