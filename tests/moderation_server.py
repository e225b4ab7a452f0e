"""A scripted OpenAI-compatible moderation endpoint on a real loopback HTTP server: texts
containing a trigger word get a high score in one category; it records what it was asked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRIGGERS = {"forbidden": "violence", "paris": "geography"}


def scores_for(text: str) -> dict[str, float]:
    low = text.lower()
    return {cat: (0.93 if word in low else 0.01) for word, cat in TRIGGERS.items()}


class ModerationServer:
    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body})
                if status != 200 or self.path != "/v1/moderations":
                    self.send_response(status if status != 200 else 404)
                    self.end_headers()
                    return
                s = scores_for(body["input"])
                reply = {
                    "id": "modr-test",
                    "model": body.get("model", "scripted"),
                    "results": [{
                        "flagged": any(v > 0.5 for v in s.values()),
                        "categories": {k: v > 0.5 for k, v in s.items()},
                        "category_scores": s,
                    }],
                }  # fmt: skip
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
