"""The one hook the generation engine calls: `Safeguards` holds the watermark settings and
the content filter, and `TextGenerator` (generate and stream) consults it, so the one-prompt
CLI, file mode, the page and the API server all get the same behaviour.

Prompts are checked before generating; outputs after generating, and while streaming every
`window_chars` new characters: text reaches the caller only after the filter passed it, and
a flagged window ends the stream (the model stops at its next token) with the refusal
message and finish_reason "content_filter".
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lora_alpaca.safeguards.moderation import ModerationUnavailable, Verdict
from lora_alpaca.safeguards.watermark import WatermarkSettings

DEFAULT_REFUSAL = "Sorry, I can't help with that."
CONTENT_FILTER = "content_filter"


def log(message: str) -> None:
    print(f"[moderation] {message}", file=sys.stderr, flush=True)


@dataclass
class Safeguards:
    watermark: WatermarkSettings | None = None
    moderator: Callable[[str], Verdict] | None = None
    backend: str = "none"  # for log lines
    refusal: str = DEFAULT_REFUSAL
    window_chars: int = 64
    fail_open: bool = False

    def watermark_processor(self, model, device):
        """transformers' WatermarkLogitsProcessor over `model`'s vocabulary (None without
        --watermark): the one construction both the generator and the API server use."""
        if self.watermark is None:
            return None
        vocab = model.config.get_text_config().vocab_size
        return self.watermark.transformers_config().construct_processor(vocab, device)

    def check(self, text: str, what: str) -> Verdict | None:
        """The verdict when `text` is flagged, else None. An unavailable filter raises
        (fail closed) unless fail_open, which logs and lets the text through."""
        if self.moderator is None:
            return None
        try:
            verdict = self.moderator(text)
        except ModerationUnavailable as e:
            if not self.fail_open:
                log(f"filter unavailable, refusing ({e})")
                raise
            log(f"filter unavailable, letting the {what} through (--moderation_fail_open): {e}")
            return None
        if not verdict.flagged:
            return None
        # The categories, never the text: logs are often kept longer and read more widely.
        log(f"flagged {what} ({self.backend}, {len(text)} chars): {verdict.describe()}")
        return verdict

    def moderate(self, text: str) -> Verdict:
        """For the API's /v1/moderations: the backend's verdict, unavailability raised."""
        if self.moderator is None:
            return Verdict(False, {})
        return self.moderator(text)


def moderated_stream(
    pieces: Iterator, guard: Safeguards, refused: Callable[[str], object]
) -> Iterator[tuple[str, object | None]]:
    """Pass (text so far, final result) pairs through the filter window by window.

    `refused(text)` builds the final result for a flagged output (refusal text,
    finish_reason content_filter). Closing `pieces` cancels generation.
    """
    checked = 0  # length of the text the filter has passed and the caller has seen
    try:
        for text, final in pieces:
            if final is not None:
                if guard.check(final.text, "output"):
                    yield guard.refusal, refused(text)
                else:
                    yield final.text, final
                return
            if len(text) - checked < guard.window_chars:
                continue
            # The whole text so far, not only the new window: a phrase may straddle windows.
            if guard.check(text, "output"):
                yield guard.refusal, refused(text)
                return
            checked = len(text)
            yield text, None
    finally:
        pieces.close()
