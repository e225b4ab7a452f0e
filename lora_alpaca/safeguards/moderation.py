"""Content filter backends: each is a callable `text -> Verdict`.

- `none`: everything passes (the default; no filter is built at all).
- `keywords`: a word/phrase list, matched whole-word and case-insensitively; `[category]`
  lines group the phrases below them (the category is what the log line names).
- `openai`: any OpenAI-compatible `POST {base}/moderations` endpoint (OpenAI's own, a local
  server, or our `generate.py --api`), through the `openai` client; flagged when any
  category score reaches the threshold (or, when the endpoint sends no scores, its own flag).
- `python:MODULE:FUNCTION`: the user's classifier, `FUNCTION(text)` returning a bool, a
  `{"flagged": bool, "categories": {...}}` dict, or a `(bool, categories)` pair.

A backend that cannot answer raises `ModerationUnavailable`; the caller fails closed
unless the user chose --moderation_fail_open.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_alpaca.errors import UsageError

STARTER_KEYWORDS = Path(__file__).with_name("keywords.txt")
BACKENDS = ("none", "keywords", "openai", "python:MODULE:FUNCTION")


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: dict[str, float] = field(default_factory=dict)  # category -> score (1.0: hit)

    def describe(self) -> str:
        return ", ".join(f"{k}={v:.2f}" for k, v in sorted(self.categories.items())) or "-"


class ModerationUnavailable(UsageError):
    """The filter could not give an answer (endpoint down, bad reply, classifier crashed).
    A UsageError, so CLI modes end with its one line and exit 2."""


class KeywordFilter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.patterns = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> dict[str, re.Pattern]:
        if not path.is_file():
            raise UsageError(f"--moderation_keywords: no such file {str(path)!r}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--moderation_keywords {path}: not UTF-8 text") from None
        groups: dict[str, list[str]] = {}
        category = "keyword"
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                category = line[1:-1].strip() or "keyword"
                continue
            groups.setdefault(category, []).append(line)
        if not groups:
            raise UsageError(f"--moderation_keywords {path}: no words or phrases in the file")
        # Whole words: \b would fail next to punctuation at a phrase's edge ("c++"), so the
        # edges are "not a word character" lookarounds; inner spaces match any whitespace.
        return {
            cat: re.compile(
                "|".join(
                    r"(?<!\w)" + r"\s+".join(map(re.escape, p.split())) + r"(?!\w)"
                    for p in sorted(phrases, key=len, reverse=True)
                ),
                re.IGNORECASE,
            )
            for cat, phrases in groups.items()
        }

    def __call__(self, text: str) -> Verdict:
        hits = {cat: 1.0 for cat, pat in self.patterns.items() if pat.search(text)}
        return Verdict(bool(hits), hits)


class OpenAIModeration:
    def __init__(self, api_base: str, threshold: float, model: str | None, timeout: float,
                 api_key: str | None):  # fmt: skip
        from openai import OpenAI

        self.api_base = api_base
        self.threshold = threshold
        self.model = model
        # No retries: a filter that is down should fail (closed) now, not after backoffs.
        self.client = OpenAI(
            base_url=api_base, api_key=api_key or "not-needed", timeout=timeout, max_retries=0
        )

    def __call__(self, text: str) -> Verdict:
        import openai

        kwargs = {"input": text, **({"model": self.model} if self.model else {})}
        try:
            reply = self.client.moderations.create(**kwargs)
            result = reply.results[0]
        except openai.APIConnectionError as e:
            raise ModerationUnavailable(
                f"--moderation openai: cannot reach {self.api_base} ({type(e).__name__}: {e})"
            ) from None
        except openai.APIStatusError as e:
            raise ModerationUnavailable(
                f"--moderation openai: {self.api_base} answered HTTP {e.status_code}"
            ) from None
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise ModerationUnavailable(
                f"--moderation openai: {self.api_base} sent no usable moderation result ({e})"
            ) from None
        scores = {k: float(v) for k, v in (result.category_scores or {}).model_dump().items()
                  if v is not None} if result.category_scores is not None else {}  # fmt: skip
        if scores:
            hit = {k: v for k, v in scores.items() if v >= self.threshold}
            return Verdict(bool(hit), hit)
        cats = {k: 1.0 for k, v in (result.categories or {}).model_dump().items() if v}
        return Verdict(bool(result.flagged), cats)


class PythonModeration:
    def __init__(self, spec: str):
        _, module_name, func_name = spec.split(":", 2)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"--moderation {spec}: cannot import {module_name!r} ({e})") from None
        self.func: Callable = getattr(module, func_name, None)
        if not callable(self.func):
            raise UsageError(f"--moderation {spec}: {module_name} has no function {func_name!r}")
        self.spec = spec

    def __call__(self, text: str) -> Verdict:
        try:
            out = self.func(text)
        except Exception as e:  # the user's code: any failure means "no answer"
            raise ModerationUnavailable(
                f"--moderation {self.spec}: the classifier raised {type(e).__name__}: {e}"
            ) from None
        if isinstance(out, Verdict):
            return out
        if isinstance(out, bool):
            return Verdict(out, {"custom": 1.0} if out else {})
        if isinstance(out, tuple) and len(out) == 2:
            return Verdict(bool(out[0]), {str(k): float(v) for k, v in dict(out[1]).items()})
        if isinstance(out, dict) and "flagged" in out:
            cats = {str(k): float(v) for k, v in dict(out.get("categories") or {}).items()}
            return Verdict(bool(out["flagged"]), cats)
        raise ModerationUnavailable(
            f"--moderation {self.spec}: returned {type(out).__name__}; expected a bool, "
            "(flagged, categories) or {'flagged': ..., 'categories': ...}"
        )


def build_backend(name: str, keywords: str | None, api_base: str | None, threshold: float,
                  model: str | None, timeout: float, api_key: str | None):  # fmt: skip
    """The filter for --moderation, or None for `none`; one-line errors before any load."""
    if name == "none":
        return None
    if name == "keywords":
        return KeywordFilter(Path(keywords) if keywords else STARTER_KEYWORDS)
    if name == "openai":
        if not api_base:
            raise UsageError(
                "--moderation openai needs --moderation_api_base URL "
                "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)"
            )
        if not api_base.startswith(("http://", "https://")):
            raise UsageError(f"--moderation_api_base {api_base!r}: must start with http(s)://")
        if not 0 < threshold <= 1:
            raise UsageError(f"--moderation_threshold {threshold}: must be in (0, 1]")
        return OpenAIModeration(api_base.rstrip("/"), threshold, model, timeout, api_key)
    if name.startswith("python:") and name.count(":") == 2 and all(name.split(":")[1:]):
        return PythonModeration(name)
    raise UsageError(f"--moderation {name!r}: allowed: {', '.join(BACKENDS)}")
