"""Teacher answers -> candidate tasks, and Stanford's filters, each with a named reason.

Stanford's post_process_gpt3_response, made more forgiving where it threw good tasks away:
its blocks had to carry exactly the expected number, so one skipped or repeated number
(numbering drift) lost every task after it; here each block only has to be consistent with
itself, and a block also ends where the next "N. Instruction:" line begins even without
the `###` separator. A chat model's preamble before its first task is ignored, and a block is only a
separator away from the next when `###` stands on its own line (a markdown heading such as
`### Steps` inside an output does not split it).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from lora_alpaca.selfinstruct.prompt import NO_INPUT

LABEL = re.compile(r"(\d+)\s*\.\s*(Instruction|Input|Output)\s*:")
# A block ends at a `###` line, or where the next "N. Instruction:" line starts (small
# teachers often drop the separators; Stanford then lost the whole answer as one block).
SEPARATOR = re.compile(
    r"(?m)^[ \t]*###[ \t]*(?=\n|$|\d+\s*\.\s*Instruction)|(?=^[ \t]*\d+\s*\.\s*Instruction\s*:)"
)
# Stanford's blacklist: tasks a text-only model cannot do. Whole words, any case.
BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.I)
MIN_WORDS_EXCLUSIVE = 3  # Stanford drops instructions of 3 words or fewer ...
MAX_WORDS = 150  # ... and of more than 150 words

REASONS = (
    "malformed",
    "truncated",
    "too_short",
    "too_long",
    "blacklisted",
    "write_a_program",
    "starts_with_punctuation",
    "starts_non_ascii",
    "empty_output",
    "too_similar",
)


@dataclass
class Parsed:
    tasks: list[dict]  # {"instruction", "input", "output"}
    rejected: list[tuple[str, str]]  # (reason, the block's instruction or raw text)


def filter_reason(instruction: str, output: str) -> str | None:
    """Why Stanford's filters drop this task, or None to keep it."""
    words = len(instruction.split())
    if words <= MIN_WORDS_EXCLUSIVE:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if BLACKLIST_RE.search(instruction):
        return "blacklisted"
    # Stanford: teachers slip "Write a program" into many tasks, and it is unclear whether
    # the answer should be the program or its result.
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    if not output.strip():  # not Stanford's: finetune.py would skip such a row anyway
        return "empty_output"
    return None


def _blocks(text: str, next_number: int) -> list[str]:
    segments = SEPARATOR.split(text)
    first = segments[0]
    if not first.strip():
        return segments
    if not LABEL.search(first) and len(segments) > 1:
        segments[0] = ""  # a chat answer's own opening sentence before its first task
    elif not any(m.group(2) == "Instruction" for m in LABEL.finditer(first)):
        # A completion continues the prompt, which ended with "k+1. Instruction:".
        segments[0] = f"{next_number}. Instruction:{first}"
    return segments


def _split_block(block: str) -> dict | None:
    labels = list(LABEL.finditer(block))
    kinds = [m.group(2) for m in labels]
    if kinds != ["Instruction", "Input", "Output"] or len({m.group(1) for m in labels}) != 1:
        return None
    instruction = block[labels[0].end() : labels[1].start()].strip()
    task_input = block[labels[1].end() : labels[2].start()].strip()
    output = block[labels[2].end() :].strip()
    if task_input.lower() == NO_INPUT:
        task_input = ""
    return {"instruction": instruction, "input": task_input, "output": output}


def parse_answer(text: str, finish_reason: str, num_prompt_instructions: int) -> Parsed:
    """Tasks in one teacher answer, filtered; `finish_reason` "length" means it was cut."""
    segments = _blocks(text, num_prompt_instructions + 1)
    # The last block of an answer cut by max_tokens is likely incomplete (Stanford drops it).
    cut = finish_reason == "length" and segments[-1].strip() != ""
    result = Parsed([], [])
    for i, block in enumerate(segments):
        if not block.strip():
            continue
        if cut and i == len(segments) - 1:
            result.rejected.append(("truncated", block.strip()[:200]))
            continue
        task = _split_block(block)
        if task is None:
            result.rejected.append(("malformed", block.strip()[:200]))
            continue
        reason = filter_reason(task["instruction"], task["output"])
        if reason:
            result.rejected.append((reason, task["instruction"]))
        else:
            result.tasks.append(task)
    return result
