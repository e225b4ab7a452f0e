"""The one logger: progress lines on stderr, from rank 0 only.

Under torchrun every process runs the same code; only rank 0 speaks, so a line is printed
once, not once per GPU. stdout stays free for what a command is asked to print (answers,
reports). With a tqdm bar running, lines go through `bar.write` so they do not tear it.
"""

from __future__ import annotations

import contextlib
import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str, bar=None, *, tag: str = "") -> None:
    """One line to stderr (`[tag] msg` when tagged); silent on ranks other than 0."""
    if not is_main_process():
        return
    if tag:
        msg = f"[{tag}] {msg}"
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str, *, tag: str = "") -> None:
    log(f"warning: {msg}", tag=tag)


@contextlib.contextmanager
def no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors...") straight from tqdm, outside its logging switches, and off a terminal it
    prints one line per refresh into our logs. Our stage lines already time that step."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
