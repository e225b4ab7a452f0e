"""`generate.py --input_file rows --output_file out.jsonl`: answer every row in batches.

Input rows: Alpaca (`instruction`, `input`), plain instruction rows (`instruction` only),
or self-instruct rows (`instruction`, `instances: [{input}]`), as a JSON array or JSONL.
Output: one JSON line per row, in input order, with the response and why it ended.
"""

from __future__ import annotations

import sys
import time

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import read_json_rows
from lora_alpaca.generate.engine import DecodingSettings, TextGenerator
from lora_alpaca.progress import bar_enabled


def _row_fields(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise UsageError(f"--input_file {where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:  # a conversation: rendered by the chat renderer (chat_page.py)
        from lora_alpaca.generate.chat_page import message_row

        return message_row(row, where)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UsageError(f"--input_file {where}: needs a non-empty string 'instruction'")
    input_text = row.get("input")
    if input_text is None and isinstance(row.get("instances"), list) and row["instances"]:
        first = row["instances"][0]
        input_text = first.get("input") if isinstance(first, dict) else None
    if input_text is not None and not isinstance(input_text, str):
        raise UsageError(f"--input_file {where}: 'input' must be a string")
    out = {"instruction": instruction, "input": input_text or ""}
    if "id" in row:
        out["id"] = row["id"]
    return out


def read_prompt_rows(path: str) -> list[dict]:
    """Rows from a .json array or .jsonl file; one-line errors naming the file and row."""
    rows = [
        _row_fields(obj, f"{path} {where}") for where, obj in read_json_rows(path, "--input_file")
    ]
    if not rows:
        raise UsageError(f"--input_file {path}: no rows")
    return rows


def answers_bytes(rows: list[dict], max_new_tokens: int) -> int:
    """Rough size of the --output_file for the free-space check before the model loads: each
    row as read plus an answer of max_new_tokens (capped at 8192: the context cap applies
    later) at 8 bytes a token (JSON escapes of non-ASCII text), plus 1 MB of slack."""
    import json

    given = sum(len(json.dumps(r)) for r in rows)
    return given + len(rows) * (min(max_new_tokens, 8192) * 8 + 128) + 1024 * 1024


def generate_rows(
    gen: TextGenerator,
    rows: list[dict],
    settings: DecodingSettings,
    batch_size: int,
    progress: bool = True,
    renderer=None,
) -> list[dict]:
    """Answers for every row, in input order. Rows are batched by prompt length (less
    padding), which does not change greedy answers: batched equals one-by-one."""
    from tqdm import tqdm

    from lora_alpaca.generate.chat_page import chat_prompt

    prompts = [
        chat_prompt(renderer, "", r["messages"][:-1], r["messages"][-1]["content"])
        if "messages" in r
        else gen.prompt_for(r["instruction"], r["input"])
        for r in rows
    ]
    lengths = [gen.prompt_tokens(p) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    results: list[dict | None] = [None] * len(rows)
    live = progress and bar_enabled()
    bar = tqdm(total=len(rows), desc="generating", unit="row", file=sys.stderr, disable=not live)
    last_line = time.time()
    for start in range(0, len(order), batch_size):
        if progress and not live and time.time() - last_line > 30:  # a log: a line per 30 s
            print(f"[generate] {start:,}/{len(rows):,} rows", file=sys.stderr, flush=True)
            last_line = time.time()
        idx = order[start : start + batch_size]
        batch = [prompts[i] for i in idx]
        # A file with conversations (renderer set) also ends answers at the renderer's
        # end-of-turn ids (ChatML's <|im_end|> where EOS is <|endoftext|>).
        eog = renderer.eog_token_ids if renderer is not None else ()
        for i, res in zip(idx, gen.generate(batch, settings, eog_ids=eog), strict=True):
            results[i] = {
                **rows[i],
                "response": res.text,
                "finish_reason": res.finish_reason,
                "new_tokens": res.new_tokens,
            }
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]
