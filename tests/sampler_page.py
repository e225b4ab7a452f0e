"""A live generate.py sampler page (gradio) on a free loopback port, for the browser and
client tests: started in its own session so stopping it stops every child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from api_server import ROOT, free_port


@contextmanager
def sampler_page(*args: str, log: Path, startup_s: float = 300) -> Iterator[dict]:
    """generate.py with `args` (its output in `log`) until the page answers 200; yields
    {"url", "port", "log"} and stops the process group afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "generate.py"), *map(str, args), "--server_port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"generate.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sampler not up after {startup_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
