"""Fault-injection hooks for the reliability tests (tests/test_fault_injection.py,
tests/test_finetune.py), read once from the environment; the loop makes one call per step.

  LORA_ALPACA_FAULT_NAN_STEP=N     the loss of step N becomes NaN (the sentinel must stop)
  LORA_ALPACA_FAULT_SIGNAL_STEP=N  the process sends itself a real SIGTERM during step N
  LORA_ALPACA_ROW_LOG=PATH         one JSON line per step: which rows it trains on
  LORA_ALPACA_FAULT_SLOW_SAVE=S    (read in checkpoint.py) sleep S s before a checkpoint's
                                   COMPLETE marker, so a test can kill a half-written one
Unset (every real run), each hook is a comparison of two ints.
"""

from __future__ import annotations

import json
import os
import signal

import torch


class Faults:
    def __init__(self, is_main_process: bool):
        self.nan_step = int(os.environ.get("LORA_ALPACA_FAULT_NAN_STEP", "0"))
        self.signal_step = int(os.environ.get("LORA_ALPACA_FAULT_SIGNAL_STEP", "0"))
        self.row_log = os.environ.get("LORA_ALPACA_ROW_LOG") if is_main_process else None

    def at_step(self, step: int, epoch: int, window: list[int], loss_sum: torch.Tensor):
        """Called after step `step`'s backward, before its loss and stop flag are summed
        across processes (so a signal sent here stops the run at this very step, as a real
        one that arrives before the sum does). Returns the (maybe poisoned) loss sum."""
        if step == self.nan_step:
            # Not logged as trained: the sentinel refuses the update of this step.
            return loss_sum * float("nan")
        if self.row_log:
            with open(self.row_log, "a") as fh:
                fh.write(json.dumps({"step": step, "epoch": epoch, "rows": window}) + "\n")
        if step == self.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_sum
