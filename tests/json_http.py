"""The plumbing the scripted OpenAI-style test servers share (scripted_teacher.py,
scripted_openai_server.py, moderation_server.py): stdlib http.server bound to 127.0.0.1 on
a port the OS picks, JSON bodies in and out, no request log on stderr; and the launcher
the tests use to run one of them as its own process and always stop it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


class JsonHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: the tests read replies, not access logs
        pass

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def loopback_server(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", 0), handler)


def serve_printing_port(server: ThreadingHTTPServer) -> None:
    """For a server run as a script: `PORT <n>` on stdout (what `server_process` reads),
    then serve until terminated."""
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


@contextlib.contextmanager
def server_process(script: str, *args: str):
    """Runs tests/<script> in its own process and yields its port; always stops it."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
