"""--threads: a user on a machine shared with other jobs learns that torch's threads compete
with them, and can choose how many to train with; on a quiet machine nothing is said."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import finetune
from test_finetune import TINY_FLAGS, write_rows

from lora_alpaca.train.cpu_threads import busy_cores_note, other_jobs_cores

SPIN = "import time\nend = time.time() + 120\nwhile time.time() < end: pass\n"


def spinners(n: int) -> list[subprocess.Popen]:
    """n other jobs, each keeping one core busy (killed by the caller)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def test_busy_cores_are_other_processes_not_this_one():
    cores = os.cpu_count() or 1
    # This process spinning in a thread while the sample sleeps: its own time is taken out.
    done = threading.Event()

    def busy():
        while not done.is_set():
            pass

    spin = threading.Thread(target=busy)
    spin.start()
    try:
        own = other_jobs_cores(0.5)
    finally:
        done.set()
        spin.join()
    procs = spinners(1)
    try:
        time.sleep(0.3)  # the child is past its start-up
        other = other_jobs_cores(0.5)
    finally:
        stop(procs)
    assert own is not None and other is not None
    assert own < 0.5, own
    assert 0.7 <= other <= cores + 0.1, other


def test_note_only_when_other_jobs_hold_the_cores_the_threads_need():
    assert busy_cores_note(2, 0.1, 2) is None  # idle
    assert busy_cores_note(2, 0.4, 2) is None  # noise
    assert busy_cores_note(1, 1.9, 2) is None  # one thread: nothing fewer to suggest
    assert busy_cores_note(2, None, 2) is None  # no /proc
    note = busy_cores_note(2, 1.8, 2)
    assert note and "1.8 of the 2 CPU cores" in note and "--threads 1" in note, note
    assert "--threads 3" in busy_cores_note(8, 4.6, 8)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("threads") / "rows.json")


def run(tiny_model, rows, out, *extra):
    r = finetune("--base_model", tiny_model, "--data", rows, "--output_dir", out, *TINY_FLAGS,
                 "--max_steps", "1", "--val_set_size", "0", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((out / "run.json").read_text())


def test_busy_machine_gets_a_note_and_threads_flag_is_obeyed(tiny_model, rows, tmp_path):
    cores = os.cpu_count() or 1
    # Quiet machine (positive control): no note, torch's default thread count, recorded.
    r, info = run(tiny_model, rows, tmp_path / "quiet")
    assert "--threads" not in r.stderr, r.stderr[-2000:]
    default = info["torch_threads"]
    assert default >= 1 and f"{default} CPU thread" in r.stderr

    # Every core busy with another job: the note names the flag, the run still trains.
    procs = spinners(cores)
    try:
        time.sleep(0.5)
        r, _ = run(tiny_model, rows, tmp_path / "busy")
    finally:
        stop(procs)
    if default > 1:
        assert "other jobs kept" in r.stderr and "try --threads" in r.stderr, r.stderr[-2000:]
    else:  # one thread: there is nothing fewer to suggest
        assert "--threads" not in r.stderr

    # The user's choice is used, recorded, and not second-guessed.
    r, info = run(tiny_model, rows, tmp_path / "one", "--threads", "1")
    assert info["torch_threads"] == 1 and info["config"]["threads"] == 1
    assert ", 1 CPU thread\n" in r.stderr and "other jobs kept" not in r.stderr
