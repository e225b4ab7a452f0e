"""A scripted OpenAI-compatible teacher for the self-instruct tests: a real HTTP server
(stdlib http.server) answering /v1/chat/completions and /v1/completions with task lists
that are a pure function of the prompt (sha256), so two runs that send the same prompts
get the same answers.

    python tests/scripted_teacher.py [--delay S] [--fail_first K --fail_status 429]

prints `PORT <n>` once listening on 127.0.0.1 (port chosen by the OS). GET /stats gives
the counts of requests served and failed. Answers mix good tasks with ones each filter
must reject (blacklisted words, "Write a program", too short, a copy of an example).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
import threading
import time

from json_http import JsonHandler, loopback_server, serve_printing_port

MODEL = "scripted-teacher"
SYLLABLES = "ba ko ri tu me sa lo ni ve da pu ze fi go ha ju ky wo xe qua".split()
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]
VERBS = "Describe Explain Summarize Classify Rewrite List Suggest Compare Translate Name".split()
TASKS_PER_ANSWER = 5


def task_list(prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(answer text, finish_reason, completion tokens) for one prompt."""
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    start = int(re.search(r"(\d+)\. Instruction:\s*$", prompt).group(1))
    first_example = re.search(r"1\. Instruction: (.*)\n", prompt).group(1)
    blocks = []
    for number in range(start, start + TASKS_PER_ANSWER):
        roll = rng.random()
        if roll < 0.1:
            instruction = f"Draw a picture of the {rng.choice(WORDS)} {rng.choice(WORDS)}."
        elif roll < 0.15:
            instruction = f"Write a program that sorts {rng.choice(WORDS)} lists."
        elif roll < 0.22:
            instruction = "Sort these."
        elif roll < 0.3:
            instruction = first_example  # a copy of an example: too similar
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
            instruction = f"{rng.choice(VERBS)} the {words}."
        task_input = (
            " ".join(rng.choice(WORDS) for _ in range(6)) if rng.random() < 0.4 else "<noinput>"
        )
        output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
        blocks.append(
            f"{number}. Instruction: {instruction}\n{number}. Input:\n{task_input}\n"
            f"{number}. Output:\n{output}"
        )
    text = "\n###\n".join(blocks)
    words = text.split(" ")
    if len(words) > max_tokens:  # cut like a length stop
        return " ".join(words[:max_tokens]), "length", max_tokens
    return text, "stop", len(words)


class Handler(JsonHandler):
    server_version = "scripted-teacher/1"

    def do_GET(self):
        if self.path == "/stats":
            return self.send_json(200, dict(self.server.stats))
        if self.path == "/v1/models":
            return self.send_json(
                200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
            )
        self.send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        body = self.read_json()
        stats = self.server.stats
        with self.server.lock:
            stats["requests"] += 1
            fail = stats["requests"] <= self.server.fail_first
            if fail:
                stats["failed"] += 1
        if fail:
            return self.send_json(
                self.server.fail_status, {"error": {"message": "scripted failure"}}
            )
        if body.get("model") != MODEL:
            return self.send_json(
                404, {"error": {"message": f"model {body.get('model')!r} not found"}}
            )
        time.sleep(self.server.delay)
        if self.path == "/v1/chat/completions":
            prompt = body["messages"][-1]["content"]
            text, reason, n = task_list(prompt, body.get("max_tokens", 3072))
            text = "Here are more tasks:\n\n" + text
            if self.server.junk:
                text = "1. Instruction: I cannot help with that.\n###\nSorry."
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
            kind = "chat.completion"
        elif self.path == "/v1/completions":
            prompt = body["prompt"]
            text, reason, n = task_list(prompt, body.get("max_tokens", 3072))
            text = " " + text.split("Instruction: ", 1)[1]  # continue after "k. Instruction:"
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            kind = "text_completion"
        else:
            return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        self.send_json(
            200,
            {
                "id": "x",
                "object": kind,
                "created": 0,
                "model": MODEL,
                "choices": [choice],
                "usage": usage,
            },
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--fail_first", type=int, default=0)
    ap.add_argument("--fail_status", type=int, default=503)
    ap.add_argument("--junk", action="store_true", help="answer with text no parser can use")
    args = ap.parse_args()
    server = loopback_server(Handler)
    server.stats = {"requests": 0, "failed": 0}
    server.lock = threading.Lock()
    server.delay, server.fail_first, server.fail_status = (
        args.delay,
        args.fail_first,
        args.fail_status,
    )
    server.junk = args.junk
    serve_printing_port(server)


if __name__ == "__main__":
    sys.exit(main())
