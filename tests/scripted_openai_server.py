"""A scripted OpenAI-compatible chat server for the evaluate tests (stdlib only, loopback).

`python scripted_openai_server.py LOG.jsonl` binds 127.0.0.1 on a free port, prints
`PORT <n>` and logs every request body to LOG.jsonl. Judge prompts (two answers) are
answered by preferring the answer containing "GOOD"; the model name picks the behaviour:
- logprob-judge: reply "B" (or "A") with top_logprobs 0.80 / 0.15 for the preferred / other
  label (and 0.05 for a non-label token), so the parsed preference must be 0.8 / 0.95;
- text-judge: no logprobs, the reply "Answer (B) is better.";
- strict-judge: HTTP 400 when logprobs are asked for, else like text-judge;
- confused-judge: "I cannot tell." (no verdict).
Other prompts (candidates) get "GOOD answer: <first words of the prompt>".
"""

from __future__ import annotations

import json
import math
import re
import sys

from json_http import JsonHandler, loopback_server, serve_printing_port

PAIR_RE = re.compile(r"## Answer \(A\)\n(.*?)\n\n## Answer \(B\)\n(.*?)\n\nWhich", re.S)


def completion(model: str, content: str, logprobs=None, finish="stop", prompt_tokens=0) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": finish, "logprobs": logprobs}  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
             "total_tokens": prompt_tokens + 1}  # fmt: skip
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [choice], "usage": usage}  # fmt: skip


def answer(body: dict) -> tuple[int, dict]:
    model = body.get("model", "")
    text = "\n".join(m["content"] for m in body["messages"])
    tokens = len(text.split())
    pair = PAIR_RE.search(text)
    if not pair:
        words = " ".join(body["messages"][-1]["content"].split()[:4])
        return 200, completion(model, f"GOOD answer: {words}", prompt_tokens=tokens)
    better = "A" if "GOOD" in pair.group(1) else "B"
    other = "B" if better == "A" else "A"
    if model == "logprob-judge":
        top = [{"token": better, "logprob": math.log(0.80), "bytes": None},
               {"token": " " + other, "logprob": math.log(0.15), "bytes": None},
               {"token": "C", "logprob": math.log(0.05), "bytes": None}]  # fmt: skip
        lp = {"content": [{"token": better, "logprob": math.log(0.8), "bytes": None,
                           "top_logprobs": top}]}  # fmt: skip
        return 200, completion(model, better, lp, prompt_tokens=tokens)
    if model == "strict-judge" and body.get("logprobs"):
        return 400, {
            "error": {"message": "logprobs not supported", "type": "invalid_request_error"}
        }
    if model in ("text-judge", "strict-judge"):
        return 200, completion(model, f"Answer ({better}) is better.", prompt_tokens=tokens)
    return 200, completion(model, "I cannot tell.", prompt_tokens=tokens)


class Handler(JsonHandler):
    def do_POST(self):
        body = self.read_json()
        with open(LOG, "a") as fh:
            fh.write(json.dumps(body) + "\n")
        if not self.path.endswith("/chat/completions"):
            return self.send_json(404, {"error": {"message": "not found"}})
        self.send_json(*answer(body))


if __name__ == "__main__":
    LOG = sys.argv[1]
    serve_printing_port(loopback_server(Handler))
