"""One exception for every mistake a user can make, and the exit code it maps to.

Scripts raise `UsageError` for bad flags, bad files and bad rows; `cli.run` prints it
as one line and exits 2. Anything else is a bug in this project and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    def __init__(self, message: str):
        # One line, always: a multi-line message would be truncated by log tooling and
        # hides which flag or row is at fault.
        super().__init__(" ".join(str(message).split()))


class Problems:
    """Runs independent checks and keeps each one's UsageError, so that one run names every
    bad flag or file at once (one line, joined by '; ') instead of one per try."""

    def __init__(self):
        self.messages: list[str] = []

    def check(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None with its UsageError kept."""
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            self.messages.append(str(e))
            return None

    def raise_any(self) -> None:
        if self.messages:
            raise UsageError("; ".join(self.messages))
