"""Throughput of `generate.py --api` at 1, 4 and 16 concurrent clients (requests/s and
generated tokens/s), against the same server with batching off (--api_max_batch 1: one
request at a time) and, when it starts here, transformers' own `transformers serve`.

    python bench/bench_api.py                       # SmolLM2-135M-Instruct, 32 new tokens
    python bench/bench_api.py --model PATH --max_tokens 64 --levels 1,4,16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "Name three primary colors.",
    "How do airplanes fly?",
    "Describe a cat in one sentence.",
    "What is photosynthesis?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, wait_s: float = 300) -> subprocess.Popen | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(
                f"[bench] {' '.join(cmd[:3])} exited: {proc.stderr.read()[-800:]}", file=sys.stderr
            )
            return None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    return None


def load(
    url: str, model: str, clients: int, n_requests: int, max_tokens: int
) -> tuple[float, float]:
    def one(i: int) -> int:
        body = {
            "model": model,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    one(0)  # warm-up
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        tokens = sum(ex.map(one, range(n_requests)))
    dt = time.perf_counter() - t0
    return n_requests / dt, tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M)")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--requests_per_client", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lora_alpaca.default_model import default_model_path

    model = args.model or str(default_model_path())
    levels = [int(x) for x in args.levels.split(",")]
    top = max(levels)
    servers = {
        f"generate.py --api (batch {top})": ["--api_max_batch", str(top)],
        "generate.py --api (batch 1: one at a time)": ["--api_max_batch", "1", "--api_max_n", "1"],
    }
    rows = []
    for label, extra in servers.items():
        port = free_port()
        cmd = [
            sys.executable,
            "generate.py",
            "--api",
            "--base_model",
            model,
            "--server_port",
            str(port),
            "--api_queue_size",
            "256",
            *extra,
        ]
        proc = start(cmd, port)
        if proc is None:
            continue
        try:
            for c in levels:
                rps, tps = load(
                    f"http://127.0.0.1:{port}",
                    "base",
                    c,
                    max(c * args.requests_per_client, 8),
                    args.max_tokens,
                )
                rows.append((label, c, rps, tps))
                print(
                    f"[bench] {label} clients={c}: {rps:.2f} req/s, {tps:.1f} tok/s",
                    file=sys.stderr,
                )
        finally:
            proc.terminate()
            proc.wait(30)
    exe = shutil.which("transformers")
    if exe:
        port = free_port()
        proc = start([exe, "serve", model, "--port", str(port), "--host", "127.0.0.1"], port)
        if proc is None:
            print("[bench] transformers serve did not start (see above)", file=sys.stderr)
        else:
            try:
                for c in levels:
                    rps, tps = load(
                        f"http://127.0.0.1:{port}",
                        model,
                        c,
                        max(c * args.requests_per_client, 8),
                        args.max_tokens,
                    )
                    rows.append(("transformers serve", c, rps, tps))
                    print(
                        f"[bench] transformers serve clients={c}: {rps:.2f} req/s", file=sys.stderr
                    )
            except httpx.HTTPError as e:
                print(f"[bench] transformers serve failed under load: {e}", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(30)
    print("| server | clients | requests/s | generated tokens/s |\n|---|---:|---:|---:|")
    for label, c, rps, tps in rows:
        print(f"| {label} | {c} | {rps:.2f} | {tps:.1f} |")


if __name__ == "__main__":
    main()
