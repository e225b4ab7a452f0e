"""Keep the libraries' messages that are not the user's business off stderr.

Each filter names one exact message; every other warning still shows. Installed from
`lora_alpaca/__init__.py`, so it runs before any module imports bitsandbytes or peft.
"""

from __future__ import annotations

import logging
import sys
import warnings

# bitsandbytes logs this at import on any AVX512-BF16 CPU without the optional `kernels`
# package; it falls back to its own CPU kernel, which is what we use (4-bit is a GPU path).
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Install the filters once per process (idempotent)."""
    bnb = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage(_BNB_MESSAGE))
    # peft's get_peft_model reads `model.is_gradient_checkpointing`, which transformers 5
    # deprecates; the call is inside peft, not ours, and the user can do nothing about it.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def quiet_progress_bars_unless_terminal() -> None:
    """transformers' per-load "Loading weights" bars: useful live on a terminal, hundreds
    of carriage-return fragments in a log file or a CI transcript."""
    if sys.stderr.isatty():
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
