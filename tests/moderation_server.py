"""A scripted OpenAI-compatible moderation endpoint on a real loopback HTTP server: texts
containing a trigger word get a high score in one category; it records what it was asked."""

from __future__ import annotations

import threading

from json_http import JsonHandler, loopback_server

TRIGGERS = {"forbidden": "violence", "paris": "geography"}


def scores_for(text: str) -> dict[str, float]:
    low = text.lower()
    return {cat: (0.93 if word in low else 0.01) for word, cat in TRIGGERS.items()}


class ModerationServer:
    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.read_json()
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
                self.send_json(200, reply)

        self.httpd = loopback_server(Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
