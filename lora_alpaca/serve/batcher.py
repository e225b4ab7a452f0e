"""Dynamic batching: requests that arrive within a short gather window, for the same model
id, are decoded in one batch (up to --api_max_batch rows); others wait in a bounded queue.

One engine thread owns the model: switching adapters (`set_adapter` / `disable_adapter`) is
process-wide state, so batches of different model ids run one after the other, never at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lora_alpaca.serve.engine import Failed, Row, run_batch


class QueueFull(Exception):
    """More requests waiting than --api_queue_size allows."""


@dataclass
class Job:
    model_id: str
    rows: list[Row]  # the n choices (x prompts) of one request


class Batcher:
    def __init__(
        self,
        run: Callable[[str, list[Row]], list[str]],
        max_batch: int,
        queue_size: int,
        gather_s: float,
    ):
        self._run = run  # run(model_id, rows): decodes one batch with that model id active
        self.max_batch, self.queue_size, self.gather_s = max_batch, queue_size, gather_s
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self.batches_run = 0  # for /health and the tests of batching
        self.largest_batch = 0
        self.finished: dict[str, int] = {}  # rows by finish reason ("cancelled": client gone)
        self._thread = threading.Thread(target=self._loop, name="api-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.queue_size:
                raise QueueFull
            self._pending.append(job)
            self._cond.notify()

    def _take(self) -> tuple[str, list[Row]]:
        """The oldest job's model id, and every waiting job of that id that fits the batch."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
        time.sleep(self.gather_s)  # let requests sent together arrive together
        with self._cond:
            model_id = self._pending[0].model_id
            taken, kept, size = [], [], 0
            for job in self._pending:
                live = [r for r in job.rows if not r.cancel.is_set()]
                gone = len(job.rows) - len(live)  # client left before its batch started
                if gone:
                    self.finished["cancelled"] = self.finished.get("cancelled", 0) + gone
                job.rows = live
                if job.model_id == model_id and size + len(live) <= self.max_batch:
                    taken.extend(live)
                    size += len(live)
                elif live:
                    kept.append(job)
            self._pending = kept
        return model_id, taken

    def _loop(self) -> None:
        while True:
            model_id, rows = self._take()
            if not rows:
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(rows))
            try:
                for reason in self._run(model_id, rows):
                    self.finished[reason] = self.finished.get(reason, 0) + 1
            except Exception as e:  # a bug or OOM: fail this batch's requests, keep serving
                for r in rows:
                    with contextlib.suppress(Exception):
                        r.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))


def run_rows(served, model_id: str, rows: list[Row]) -> list[str]:
    """Switch `served.model` to `model_id`'s adapter (or off, for `base`) and decode."""
    entry = served.entries[model_id]
    model = served.model
    if entry.adapter_name is None and served.has_adapters:
        ctx = model.disable_adapter()
    else:
        if entry.adapter_name is not None:
            model.set_adapter(entry.adapter_name)
        ctx = contextlib.nullcontext()
    with ctx:
        # The model's EOS and its renderer's end-of-turn ids (ChatML's <|im_end|>).
        eos = list(dict.fromkeys([*served.eos_ids, *entry.renderer.eog_token_ids]))
        return run_batch(
            model, served.tokenizer, rows, eos, served.device, served.watermark_processor
        )
