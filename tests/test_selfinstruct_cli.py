"""generate_instruction.py run as a user would, against a scripted OpenAI-compatible teacher
behind a real HTTP server on loopback: resume after SIGKILL, retries, the README's command
feeding finetune.py --audit_only, and bad input as one line with nothing written."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA, finetune, run_cli, run_script
from json_http import server_process

MODEL = "scripted-teacher"


@contextlib.contextmanager
def scripted_teacher(*args: str):
    with server_process("scripted_teacher.py", *args) as port:
        yield f"http://127.0.0.1:{port}"


def stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
        return json.loads(r.read())


def teacher_args(url: str, out: Path, n: int, *extra: str) -> list[str]:
    return [
        "--api_base", f"{url}/v1", "--model", MODEL, "--num_instructions_to_generate", str(n),
        "--output_dir", str(out), "--request_batch_size", "2", "--seed", "7", *extra,
    ]  # fmt: skip


def read(out: Path, name: str):
    return json.loads((out / name).read_text())


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    with scripted_teacher("--delay", "0.2") as url:
        straight = tmp_path / "straight"
        r = run_script("generate_instruction.py", *teacher_args(url, straight, 60))
        assert r.returncode == 0, r.stderr[-2000:]
        full = read(straight, "state.json")
        assert len(read(straight, "regen.json")) == 60 and full["rounds"] >= 6

        killed = tmp_path / "killed"
        cmd = [
            sys.executable,
            str(ROOT / "generate_instruction.py"),
            *teacher_args(url, killed, 40),
        ]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once two rounds are on disk
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if read(killed, "state.json")["rounds"] >= 2:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        partial = read(killed, "state.json")
        assert 2 <= partial["rounds"] and len(partial["kept"]) < 40  # really interrupted

        r = run_script("generate_instruction.py", *teacher_args(url, killed, 40, "--resume"))
        assert r.returncode == 0, r.stderr[-2000:]
        resumed = read(killed, "state.json")
        assert resumed["kept"] == full["kept"][: len(resumed["kept"])]
        assert read(killed, "regen.json") == read(straight, "regen.json")[:40]
        assert read(killed, "alpaca_data.json") == read(straight, "alpaca_data.json")[:40]

        # a larger N on resume continues to exactly what the straight run made
        r = run_script("generate_instruction.py", *teacher_args(url, killed, 60, "--resume"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert read(killed, "state.json")["kept"] == full["kept"]
        assert read(killed, "state.json")["rng_state"] == full["rng_state"]
        for name in ("regen.json", "alpaca_data.json"):
            assert (killed / name).read_bytes() == (straight / name).read_bytes()
        assert not [p.name for p in killed.iterdir() if p.name.startswith(".")]


def test_readme_command_gives_a_file_finetune_audits(tmp_path):
    """The issue's done-when command (chat API) and finetune.py --audit_only on its output."""
    with scripted_teacher() as url:
        r = run_script(
            "generate_instruction.py", "--api_base", f"{url}/v1", "--model", MODEL,
            "--num_instructions_to_generate", "50", "--output_dir", "out/selfinstruct",
            "--price_per_1k_tokens", "0.02", cwd=tmp_path,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out" / "selfinstruct"
    rows = read(out, "alpaca_data.json")
    assert len(rows) == 50 and all(set(row) == {"instruction", "input", "output"} for row in rows)
    regen = read(out, "regen.json")
    assert set(regen[0]) == {
        "instruction", "input", "output", "most_similar_instructions", "avg_similarity_score",
    }  # fmt: skip
    assert all(max(t["most_similar_instructions"].values()) <= 0.7 for t in regen)
    state = read(out, "state.json")
    assert (
        state["rejected"].get("too_similar", 0) > 0 and state["rejected"].get("blacklisted", 0) > 0
    )
    report = (out / "report.md").read_text()
    assert "too_similar" in report and "Cost at $0.02/1K tokens" in report
    assert (out / "report.png").stat().st_size > 10_000
    audit = finetune("--data", out / "alpaca_data.json", "--audit_only", in_process=True)
    assert audit.returncode == 0, audit.stderr[-2000:]


def test_completions_api_and_retries_on_429(tmp_path):
    with scripted_teacher("--fail_first", "3", "--fail_status", "429") as url:
        out = tmp_path / "c"
        args = teacher_args(url, out, 15, "--api", "completions", "--max_tokens", "70")
        r = run_script("generate_instruction.py", *args, "--max_retries", "4")
        assert r.returncode == 0, r.stderr[-2000:]
        assert stats(url)["failed"] == 3  # answered only after three 429s
    state = read(out, "state.json")
    assert len(read(out, "alpaca_data.json")) == 15
    assert state["rejected"].get("truncated", 0) > 0  # max_tokens cut answers: last task dropped


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEEDS = SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"


@pytest.mark.parametrize(
    "case, args, expected",
    [
        ("no teacher", [], "no teacher: give --api_base"),
        ("two teachers", ["--teacher_model", "x", "--api_base", "http://h/v1", "--model", "m"], "give one teacher"),
        ("scheme", ["--api_base", "127.0.0.1:8000", "--model", "m"], "must start with http"),
        ("zero", ["--api_base", "http://h/v1", "--model", "m", "--num_prompt_instructions", "0"], "--num_prompt_instructions 0"),
        ("top_p", ["--api_base", "http://h/v1", "--model", "m", "--top_p", "0"], "--top_p 0.0"),
        ("seed file", ["--api_base", "http://h/v1", "--model", "m", "--seed_tasks", "nope.jsonl"], "no such file"),
        ("bad row", ["--api_base", "http://h/v1", "--model", "m", "--seed_tasks", "BADROW"], "row 2: needs a non-empty string 'output'"),
        ("few seeds", ["--api_base", "http://h/v1", "--model", "m", "--seed_tasks", "BADROW", "--num_prompt_instructions", "9"], "row 2"),
        ("resume nothing", ["--api_base", "http://h/v1", "--model", "m", "--resume"], "does not exist (nothing to resume)"),
        ("unreachable", ["--api_base", "CLOSED", "--model", "m", "--max_retries", "0"], "cannot reach the endpoint"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, case, args, expected):
    monkeypatch.chdir(tmp_path)  # relative paths resolve where the user stands
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "Hi"}\n{"instruction": "Say bye."}\n')
    args = [str(bad) if a == "BADROW" else a for a in args]
    args = [f"http://127.0.0.1:{_closed_port()}/v1" if a == "CLOSED" else a for a in args]
    out = tmp_path / "out"
    if case == "bad row":  # one as a real process: its whole stderr is the one line
        r = run_script("generate_instruction.py", *args, "--output_dir", out, cwd=tmp_path)
    else:  # in-process: no fresh interpreter and imports per case (~6-12 s on CI)
        r = run_cli("selfinstruct", *args, "--output_dir", out)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    if case != "unreachable":  # only the endpoint errors come after the "teacher:" log line
        assert r.stderr.strip() == errors[0]
    assert not out.exists()


def test_output_folder_is_never_overwritten_and_resume_checks_the_recipe(tmp_path):
    with scripted_teacher() as url:
        out = tmp_path / "run"
        assert run_script("generate_instruction.py", *teacher_args(url, out, 10)).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        again = run_cli("selfinstruct", *teacher_args(url, out, 20))
        assert again.returncode == 2 and "pass --resume" in again.stderr
        other = run_cli(
            "selfinstruct", *teacher_args(url, out, 20, "--resume", "--temperature", "0.5")
        )
        assert other.returncode == 2 and "--temperature 0.5 (the folder has 1.0)" in other.stderr
        seeds = run_cli(
            "selfinstruct", *teacher_args(url, out, 20, "--resume", "--seed_tasks", SEEDS)
        )
        assert seeds.returncode == 2 and "--seed_tasks" in seeds.stderr
        wrong = run_cli("selfinstruct", "--api_base", f"{url}/v1", "--model", "nope",
                        "--output_dir", tmp_path / "w", "--max_retries", "0")  # fmt: skip
        assert wrong.returncode == 2 and "--model nope" in wrong.stderr.splitlines()[-1]
        assert not (tmp_path / "w").exists()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_teacher_that_never_follows_the_format_stops_the_run(tmp_path):
    with scripted_teacher("--junk") as url:
        out = tmp_path / "junk"
        r = run_script(
            "generate_instruction.py",
            *teacher_args(url, out, 5, "--max_rounds_without_progress", "3"),
        )
        assert stats(url)["requests"] == 3 * 2  # three rounds of two requests, then it stops
    assert r.returncode == 2 and "no usable task in 3 rounds" in r.stderr.splitlines()[-1]
    assert "malformed" in r.stderr.splitlines()[-1]
    assert read(out, "state.json")["rounds"] == 3 and (out / "report.md").is_file()


def test_local_teacher_model_runs_through_the_generation_engine(tmp_path, tiny_model):
    """--teacher_model: no server; a tiny random model writes junk, so the run stops after
    one idle round, having generated through lora_alpaca's TextGenerator."""
    out = tmp_path / "local"
    r = run_script(
        "generate_instruction.py", "--teacher_model", tiny_model, "--max_tokens", "16",
        "--request_batch_size", "2", "--num_instructions_to_generate", "1",
        "--max_rounds_without_progress", "1", "--output_dir", out,
    )  # fmt: skip
    assert r.returncode == 2 and "no usable task in 1 rounds" in r.stderr.splitlines()[-1], r.stderr
    state = read(out, "state.json")
    assert state["requests"] == 2 and 0 < state["usage"]["completion_tokens"] <= 32
    assert state["usage"]["prompt_tokens"] > 200
