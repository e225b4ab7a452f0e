# ruff: noqa: F811 - `shared` is the imported fixture, used as a test argument
"""Issue 11 corpus: data-loss, late-failure and traceback classes, through the real CLIs.

Reuses the bad-input harness of tests/test_bad_inputs.py (one `error:` line, exit 2,
nothing written), plus real-process tests for the output-folder lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from test_bad_inputs import (  # noqa: F401 - `shared` is a fixture
    GOOD_ROWS,
    Case,
    World,
    check_one_line,
    exp,
    ft,
    gen,
    run_case,
    shared,
)

from lora_alpaca import cli

LONG = "x" * 300


def inp(w: World) -> Path:
    return w.file("p.jsonl", '{"instruction": "a"}\n')


def truncated_model(w: World) -> Path:
    d = w.work / "trunc"
    shutil.copytree(w.tiny, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def rank_mismatch_adapter(w: World) -> Path:
    d = w.work / "ad"
    shutil.copytree(w.adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 64
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def finished_run(w: World) -> Path:
    d = w.work / "done"
    shutil.copytree(w.adapter, d)
    return d


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefg", "bcdefgh")
    )
    + "lora_target_modules: *h\n"
)

CASES = [
    # 1. data loss / silent overwrite
    Case("gen-output-equals-input", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.work / "p.jsonl"],
         ("--output_file", "same file as --input_file")),
    Case("gen-probe-equals-output", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.work / "o.jsonl", "--probe_report", w.work / "o.jsonl"],
         ("--probe_report", "same file as --output_file")),
    Case("gen-probe-equals-input", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.work / "o.jsonl", "--probe_report", w.work / "p.jsonl"],
         ("--probe_report", "same file as --input_file")),
    Case("gen-output-exists", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.file("old.jsonl", "precious\n")],
         ("--output_file", "exists", "--overwrite_output_file")),
    Case("gen-output-symlink", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", (w.work / "ln").symlink_to(w.file("t.txt", "keep")) or w.work / "ln", "--overwrite_output_file"],
         ("--output_file", "symlink", "refusing")),
    Case("gen-output-device", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", "/dev/null", "--overwrite_output_file"],
         ("--output_file", "not a regular file")),
    Case("ft-resume-auto-finished", "finetune",
         lambda w: ft(w, "--output_dir", finished_run(w), "--resume_from_checkpoint", "auto"),
         ("--resume_from_checkpoint auto", "finished run", "--init_from_adapter")),
    Case("ft-overwrite-holds-data", "finetune",
         lambda w: ft(w, "--overwrite_output_dir", "--output_dir", w.work, "--data", w.rows("d.json", GOOD_ROWS)),
         ("--overwrite_output_dir: refusing to delete", "--data")),
    Case("ft-overwrite-home", "finetune",
         lambda w: ft(w, "--overwrite_output_dir", "--output_dir", Path.home()),
         ("--overwrite_output_dir: refusing to delete", "home folder")),
    Case("ft-overwrite-foreign-files", "finetune",
         lambda w: ft(w, "--overwrite_output_dir", "--output_dir", (w.work / "mine").mkdir() or w.file("mine/thesis.tex", "x").parent),
         ("--overwrite_output_dir: refusing to delete", "thesis.tex")),
    # 2. unwritable output folders, before the model loads
    Case("ft-output-under-proc", "finetune",
         lambda w: ft(w, "--output_dir", "/proc/lora-run"), ("--output_dir", "/proc/lora-run")),
    Case("ft-output-parent-is-file", "finetune",
         lambda w: ft(w, "--output_dir", w.file("f", "x") / "run"), ("--output_dir", "is a file")),
    Case("gen-output-parent-is-file", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.file("f", "x") / "o.jsonl"],
         ("--output_file", "is a file")),
    Case("exp-output-under-proc", "export",
         lambda w: exp(w, "--output_dir", "/proc/merged"), ("--output_dir", "/proc/merged")),
    # 3. unbounded work
    Case("ft-yaml-alias-bomb", "finetune",
         lambda w: ft(w, "--config", w.file("bomb.yaml", BOMB)), ("--config", "aliases expand", "10,000")),
    Case("ft-yaml-list-for-string", "finetune",
         lambda w: ft(w, "--config", w.file("l.yaml", "prompt_template_name: [a, b]\n")),
         ("--config", "prompt_template_name", "single value")),
    # 4. tracebacks -> one line
    Case("ft-deeply-nested-json", "finetune",
         lambda w: ft(w, "--data", w.file("deep.json", nested(100_000))), ("deep.json", "nested too deeply")),
    Case("gen-deeply-nested-json", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", w.file("deep.json", nested(100_000)), "--output_file", w.out],
         ("--input_file", "nested too deeply")),
    Case("ft-truncated-safetensors", "finetune",
         lambda w: ft(w, "--base_model", truncated_model(w)), ("--base_model", "truncated")),
    Case("gen-truncated-safetensors", "generate",
         lambda w: ["--base_model", truncated_model(w), "--prompt", "hi"], ("--base_model", "truncated")),
    Case("exp-truncated-safetensors", "export",
         lambda w: exp(w, "--base_model", truncated_model(w)), ("--base_model", "truncated")),
    Case("gen-adapter-rank-mismatch", "generate",
         lambda w: gen(w, "--lora_weights", rank_mismatch_adapter(w)), ("--lora_weights", "r=64", "rank 4")),
    Case("ft-init-adapter-rank-mismatch", "finetune",
         lambda w: ft(w, "--init_from_adapter", rank_mismatch_adapter(w), "--lora_r", "4"),
         ("--init_from_adapter", "r=64", "rank 4")),
    Case("exp-adapter-rank-mismatch", "export",
         lambda w: exp(w, "--lora_weights", rank_mismatch_adapter(w)), ("--lora_weights", "r=64", "rank 4")),
    # A bad adapter and bad flags: all named in the same line, not one per try.
    Case("exp-bad-adapter-and-flags", "export",
         lambda w: exp(w, "--lora_weights", rank_mismatch_adapter(w), "--gguf", "q9", "--max_shard_size", "big"),
         ("--lora_weights", "r=64", "; --gguf 'q9': 'q9' is not a GGUF type", "; --max_shard_size 'big': not a size")),
    Case("ft-name-too-long-data", "finetune",
         lambda w: ft(w, "--data", w.work / LONG), ("--data", "at most 255 bytes")),
    Case("ft-name-too-long-output", "finetune",
         lambda w: ft(w, "--output_dir", w.work / LONG / "x"), ("--output_dir", "at most 255 bytes")),
    Case("gen-name-too-long-output", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", inp(w), "--output_file", w.work / (LONG + ".jsonl")],
         ("--output_file", "at most 255 bytes")),
    Case("exp-name-too-long-output", "export",
         lambda w: exp(w, "--output_dir", w.work / LONG), ("--output_dir", "at most 255 bytes")),
    # `~..` names no user: pathlib's expanduser raises RuntimeError; the path stays as typed.
    Case("ft-data-tilde-no-user", "finetune", lambda w: ft(w, "--data", "~.."), ("--data ~..", "no such file")),
    Case("ft-resume-tilde-no-user", "finetune",
         lambda w: ft(w, "--resume_from_checkpoint", "~../ck"), ("--resume_from_checkpoint ~../ck",)),
    Case("ft-seed-negative", "finetune", lambda w: ft(w, "--seed", "-1"), ("--seed -1", "0 .. 4294967295")),
    Case("ft-seed-too-big", "finetune", lambda w: ft(w, "--seed", str(2**32)), ("--seed 4294967296",)),
    Case("gen-seed-too-big", "generate", lambda w: gen(w, "--seed", str(2**40)), ("--seed",)),
    Case("gen-min-new-tokens-above-max", "generate",
         lambda w: gen(w, "--min_new_tokens", "300", "--max_new_tokens", "256"),
         ("--min_new_tokens 300", "0 .. --max_new_tokens (256)")),
    # Several bad decoding flags: every one named in the same line, not one per try.
    Case("gen-several-bad-decoding-flags", "generate",
         lambda w: gen(w, "--temperature", "-3", "--top_p", "2", "--max_new_tokens", "0"),
         ("--temperature -3.0: must be >= 0; --top_p 2.0: must be in (0, 1]; --max_new_tokens 0: must be >= 1",)),
    Case("ft-weight-decay-negative", "finetune", lambda w: ft(w, "--weight_decay", "-0.1"), ("--weight_decay must be >= 0",)),
    Case("ft-threads-negative", "finetune", lambda w: ft(w, "--threads", "-1"), ("--threads must be >= 0",)),
    Case("ft-learning-rate-nan", "finetune", lambda w: ft(w, "--learning_rate", "nan"), ("--learning_rate", "not a finite number")),
    Case("ft-yaml-learning-rate-inf", "finetune",
         lambda w: ft(w, "--config", w.file("c.yaml", "learning_rate: .inf\n")), ("learning_rate", "not a finite number")),
    # 5. nothing written (no dataset cache) before late exit-2 errors
    Case("ft-batch-larger-than-data-no-cache", "finetune",
         lambda w: ft(w, "--batch_size", "64", "--micro_batch_size", "4"), ("--batch_size 64 is larger",)),
    Case("ft-unknown-target-module-no-cache", "finetune",
         lambda w: ft(w, "--lora_target_modules", "nope_proj"), ("nope_proj",)),
    # 6. silent misreadings
    Case("ft-num-epochs-fraction", "finetune",
         lambda w: ft(w, "--config", w.file("c.yaml", "num_epochs: 0.5\n")), ("num_epochs", "0.5", "not a whole number")),
    Case("ft-val-set-size-bad", "finetune", lambda w: ft(w, "--val_set_size", "2.5"), ("--val_set_size", "fraction in (0, 1)", "2.5")),
    Case("gen-temperature-negative-greedy", "generate",
         lambda w: gen(w, "--mode", "greedy", "--temperature", "-1"), ("--temperature -1",)),
    Case("gen-top-p-greedy", "generate", lambda w: gen(w, "--mode", "greedy", "--top_p", "2"), ("--top_p 2",)),
    Case("ft-template-is-folder", "finetune",
         lambda w: ft(w, "--prompt_template_name", (w.work / "tdir.json").mkdir() or w.work / "tdir.json"),
         ("--prompt_template_name", "is a folder")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_safety_case_one_line_exit_2_nothing_written(case, shared, tmp_path, capsys, monkeypatch):
    assert not case.cache_ok, case.id  # every safety case watches the cache too
    w = run_case(case, shared, tmp_path, capsys, monkeypatch)
    assert not w.out.exists()


def test_model_type_error_is_cut_at_a_word(shared, tmp_path, capsys):
    d = tmp_path / "badtype"
    shutil.copytree(shared["tiny"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "not-a-real-architecture-" * 20
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("generate", "--base_model", d, "--prompt", "hi")
    line = check_one_line(r.returncode, r.stderr, ("--base_model",), "model_type")
    # Cut, and at a word's end: what is kept of the model type is a prefix of it that stops
    # before a letter or digit would follow (the old cut ended in "...-no ...").
    assert line.endswith(" ...)"), line
    kept = line[: -len(" ...)")].split("`", 1)[1]
    assert cfg["model_type"].startswith(kept) and len(kept) < len(cfg["model_type"]), line
    nxt = cfg["model_type"][len(kept)]
    assert not (kept[-1].isalnum() and nxt.isalnum()), (kept[-12:], nxt)


def test_shorten_never_cuts_inside_a_word():
    from lora_alpaca.filecheck import shorten

    words = " ".join(f"word{i}" for i in range(100))
    cut = shorten(words, 50)
    assert cut.endswith(" ...") and words.startswith(cut[:-4]) and words[len(cut) - 4] == " "
    ident = "prefix " + "-".join(["segment"] * 40)
    cut = shorten(ident, 60)[:-4]
    assert ident.startswith(cut) and cut.endswith("-") and len(cut) <= 60
    assert shorten("x" * 300, 50) == "x" * 50 + " ..."  # one unbroken word: nothing better


def test_unreachable_hub_id_fails_fast_in_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "generate.py", "--base_model", "someorg/no-such-model", "--prompt", "hi"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # Without the fast path: 5 retries, 30-50 s. The bound is loose for a loaded CI box;
    # the absence of retry lines is the sharp check.
    check_one_line(p.returncode, p.stderr, ("someorg/no-such-model", "offline"), "hub")
    assert "Retrying" not in p.stderr and "Retry" not in p.stderr
    assert time.monotonic() - t0 < 45


def _ft_argv(shared, data: Path, out: Path, *extra) -> list[str]:
    return [
        sys.executable, str(ROOT / "finetune.py"), "--base_model", str(shared["tiny"]),
        "--data", str(data), "--output_dir", str(out), "--batch_size", "4",
        "--micro_batch_size", "2", "--val_set_size", "0", "--cutoff_len", "96",
        "--dtype", "fp32", *extra,
    ]  # fmt: skip


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.2)


def test_output_dir_lock_two_processes_and_stale_takeover(shared, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(GOOD_ROWS * 4))
    out = tmp_path / "run"
    env = {**os.environ, "LORA_ALPACA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env["LORA_ALPACA_FAULT_SLOW_SAVE"] = "60"  # the holder sits in its first checkpoint save
    holder = subprocess.Popen(
        _ft_argv(shared, data, out, "--max_steps", "4", "--save_steps", "1"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(out / "checkpoints", holder)
        second = subprocess.run(
            _ft_argv(shared, data, out, "--max_steps", "1", "--resume_from_checkpoint", "auto"),
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        check_one_line(
            second.returncode,
            second.stderr,
            ("another run is using it", f"pid {holder.pid}"),
            "lock",
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lora_alpaca.lock").exists()  # the dead holder's lock file is left behind
    env.pop("LORA_ALPACA_FAULT_SLOW_SAVE")
    third = subprocess.run(
        _ft_argv(shared, data, out, "--max_steps", "2", "--resume_from_checkpoint", "auto"),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert (out / "lora_alpaca.json").is_file() and not (out / ".lora_alpaca.lock").exists()


@contextlib.contextmanager
def small_disk(tmp_path: Path, name: str, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted at tmp_path/name (read-only if asked), unmounted after.
    Mounting needs root: CI runs as root; elsewhere the test is skipped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / name
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_mid_checkpoint_one_line_keeps_last_good(shared, tmp_path):
    with small_disk(tmp_path, "small", "48m") as mnt:
        data = tmp_path / "d.json"
        data.write_text(json.dumps(GOOD_ROWS * 4))
        out = mnt / "run"
        env = {**os.environ, "LORA_ALPACA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        env["LORA_ALPACA_FAULT_SLOW_SAVE"] = "3"
        proc = subprocess.Popen(
            _ft_argv(shared, data, out, "--max_steps", "6", "--save_steps", "1"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        root = out / "checkpoints"
        t0 = time.monotonic()
        while not any(p.name.startswith("checkpoint-") for p in root.glob("*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.1)
        # Another program fills the disk while the run goes on.
        with open(mnt / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
        line = check_one_line(proc.returncode, err, ("disk full", str(root), "MB free"), "disk")
        assert "last good checkpoint" in line and "resume with:" in err
        good = [p for p in root.iterdir() if p.name.startswith("checkpoint-")]
        assert good and all((p / "COMPLETE").is_file() for p in good)
        assert not list(root.glob(".tmp-*"))


def test_no_space_for_a_run_is_refused_before_model_load(shared, tmp_path, capsys, monkeypatch):
    with small_disk(tmp_path, "tiny-disk", "1m") as mnt:
        monkeypatch.setenv("LORA_ALPACA_CACHE", str(tmp_path / "cache"))
        w = World(shared["tiny"], shared["other"], shared["adapter"], shared["good_data"], tmp_path)
        r = run_cli("finetune", *ft(w, "--output_dir", mnt / "run"))
        check_one_line(r.returncode, r.stderr, ("--output_dir", "free", "needs about"), "space")
        assert list(mnt.iterdir()) == [] and not (tmp_path / "cache").exists()
        # generate's --output_file and export's --output_dir: the same check, before loading.
        for script, argv, flag in (
            ("generate", ["--base_model", w.tiny, "--input_file", inp(w),
                          "--output_file", mnt / "a.jsonl"], "--output_file"),
            ("export", exp(w, "--output_dir", mnt / "merged"), "--output_dir"),
        ):  # fmt: skip
            r = run_cli(script, *argv)
            check_one_line(r.returncode, r.stderr, (flag, "free", "needs about"), script)
            assert list(mnt.iterdir()) == [], script


def test_read_only_file_system_refused_by_every_script_before_model_load(shared, tmp_path):
    """A read-only mount (a tmpfs the test mounts, remounted ro) through the three real
    scripts: one line, exit 2, nothing else on stderr (each script logs once the model
    has loaded), no dataset cache."""
    with small_disk(tmp_path, "ro", "4m", read_only=True) as mnt:
        w = World(shared["tiny"], shared["other"], shared["adapter"], shared["good_data"], tmp_path)
        cache = tmp_path / "cache"
        env = {**os.environ, "LORA_ALPACA_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        env.pop("LORA_ALPACA_DEBUG", None)
        runs = (
            ("finetune.py", ft(w, "--output_dir", mnt / "run"), "--output_dir"),
            ("generate.py", ["--base_model", w.tiny, "--input_file", inp(w),
                             "--output_file", mnt / "a.jsonl"], "--output_file"),
            ("export_hf_checkpoint.py", exp(w, "--output_dir", mnt / "merged"), "--output_dir"),
        )  # fmt: skip
        for script, argv, flag in runs:
            p = subprocess.run(
                [sys.executable, str(ROOT / script), *map(str, argv)],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            line = check_one_line(p.returncode, p.stderr, (flag, "read-only file system"), script)
            assert p.stderr.strip().splitlines() == [line], (script, p.stderr[-2000:])
        assert not cache.exists() and list(mnt.iterdir()) == []


def test_val_set_size_fraction_on_cli_and_yaml(shared, tmp_path):
    from lora_alpaca.data.pipeline import effective_val_size
    from lora_alpaca.train.config import FinetuneConfig

    assert effective_val_size(0.1, 48) == (5, None)
    for argv in (["--val_set_size", "0.1"], ["--config", str(tmp_path / "c.yaml")]):
        (tmp_path / "c.yaml").write_text("val_set_size: 0.1\n")
        seen = {}
        cmd = cli.build_command(
            FinetuneConfig, lambda cfg, seen=seen: seen.setdefault("v", cfg.val_set_size), "x"
        )
        cmd.main(argv, standalone_mode=False)
        assert seen["v"] == 0.1


def test_max_new_tokens_is_capped_at_the_model_context(shared, tmp_path):
    p = subprocess.run(
        [sys.executable, "generate.py", "--base_model", str(shared["tiny"]), "--prompt", "hi",
         "--max_new_tokens", "100000000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "capped" in p.stderr


def test_write_atomic_never_replaces_a_symlink(tmp_path):
    from lora_alpaca.errors import UsageError
    from lora_alpaca.fileio import write_text_atomic

    target = tmp_path / "real.txt"
    target.write_text("keep")
    (tmp_path / "ln").symlink_to(target)
    with pytest.raises(UsageError):
        write_text_atomic(tmp_path / "ln", "new")
    assert (tmp_path / "ln").is_symlink() and target.read_text() == "keep"


def test_audit_recommendation_is_capped_at_the_model_context():
    from lora_alpaca.data.audit import Audit

    audit = Audit(source="d.json", template="alpaca", cutoff_len=512, train_on_inputs=False,
                  add_eos_token=True, overlength="truncate", recommended_cutoff_len=4096,
                  context_len=2048, length_percentiles={"p50": 900, "p99": 4000})  # fmt: skip
    assert audit.advised_cutoff_len == 2048  # rendered in test_audit.py's snapshot
