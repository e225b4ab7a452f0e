"""Prompt templates: find, validate, render, and read the response back out.

A template is a JSON file with `description`, `prompt_input`, `prompt_no_input` and
`response_split` (optionally `stop_strings`). Named templates live in the project's
`templates/` folder, found relative to this package (never the working directory);
any other template is a path to a `.json` file.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.filecheck import loads_json
from lora_alpaca.fileio import expand_user

# Inside the package, so a wheel carries them; in a clone this is a symlink to the top-level
# templates/ folder (one copy of each file), hence the resolve().
TEMPLATES_DIR = (Path(__file__).resolve().parent / "templates").resolve()
REQUIRED_KEYS = ("description", "prompt_input", "prompt_no_input", "response_split")
OPTIONAL_KEYS = ("stop_strings",)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def _placeholders(text: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:  # unbalanced braces
        raise ValueError(f"bad braces ({e}); write literal braces as {{{{ and }}}}") from None


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    description: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    stop_strings: tuple[str, ...]

    def build_prompt(self, instruction: str, input: str | None = None) -> str:
        """The text the model sees before its response (no response, no EOS)."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def get_response(self, output: str) -> str:
        """The response part of a full generation; never raises on odd output.

        Takes what follows the first `response_split` (if the prompt was echoed) and
        cuts at the first stop string (the model starting a new `### Instruction:`).
        """
        if self.response_split and self.response_split in output:
            output = output.split(self.response_split, 1)[1]
        return cut_at_stop(output, self.stop_strings).strip()

    def to_dict(self) -> dict:
        return {
            "description": self.description,
            "prompt_input": self.prompt_input,
            "prompt_no_input": self.prompt_no_input,
            "response_split": self.response_split,
            "stop_strings": list(self.stop_strings),
        }


def cut_at_stop(text: str, stop_strings) -> str:
    """Text before the earliest stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def derive_stop_strings(prompt_input: str, prompt_no_input: str, response_split: str) -> list[str]:
    """Section headers a sampler must stop on: every placeholder-free line of the
    templates that looks like a header (`### Instruction:`, `### Input:`...) plus the
    response marker itself, so a model that starts a new turn is cut there."""
    stops: list[str] = []
    for line in (prompt_input + "\n" + prompt_no_input).splitlines():
        line = line.strip()
        if line and "{" not in line and line.endswith(":") and len(line) <= 40:
            if line not in stops:
                stops.append(line)
    if response_split and response_split.strip() not in stops:
        stops.append(response_split.strip())
    # Markdown-style section headers (`### X:`): small models invent new ones
    # (`### Output:`, `### Explanation:`) after their answer; a new header line ends it.
    prefixes = {s.split(" ", 1)[0] for s in stops if " " in s}
    if len(prefixes) == 1 and len(stops) >= 2 and set(prefixes.pop()) == {"#"}:
        stops.append("\n" + stops[0].split(" ", 1)[0] + " ")
    return stops


def parse_template(data: object, name: str, source: str) -> PromptTemplate:
    """Validate a template's JSON content; every problem is one UsageError line."""
    if not isinstance(data, dict):
        raise UsageError(f"template {source}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(
            f"template {source}: missing key(s) {', '.join(missing)}; required: {', '.join(REQUIRED_KEYS)}"
        )
    unknown = [k for k in data if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        raise UsageError(
            f"template {source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], str):
            raise UsageError(f"template {source}: {key} must be a string")
    allowed = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}
    for key, ok in allowed.items():
        try:
            found = _placeholders(data[key])
        except ValueError as e:
            raise UsageError(f"template {source}: {key}: {e}") from None
        bad = found - ok
        if bad:
            raise UsageError(
                f"template {source}: {key} has unknown placeholder(s) "
                f"{', '.join('{' + b + '}' for b in sorted(bad))}; allowed: "
                f"{', '.join('{' + o + '}' for o in sorted(ok))}"
            )
        if "instruction" not in found:
            raise UsageError(f"template {source}: {key} must contain {{instruction}}")
    if "input" not in _placeholders(data["prompt_input"]):
        raise UsageError(f"template {source}: prompt_input must contain {{input}}")
    stops = data.get("stop_strings")
    if stops is None:
        stops = derive_stop_strings(
            data["prompt_input"], data["prompt_no_input"], data["response_split"]
        )
    elif not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise UsageError(f"template {source}: stop_strings must be a list of non-empty strings")
    return PromptTemplate(
        name=name,
        description=data["description"],
        prompt_input=data["prompt_input"],
        prompt_no_input=data["prompt_no_input"],
        response_split=data["response_split"],
        stop_strings=tuple(stops),
    )


def template_path(name_or_path: str) -> Path:
    """A bundled name (`alpaca`) or a path to the user's own `.json` template."""
    if expand_user(name_or_path).is_dir():
        raise UsageError(
            f"--prompt_template_name {name_or_path}: is a folder; give a template name or a .json file"
        )
    if name_or_path.endswith(".json"):
        path = expand_user(name_or_path)
        if not path.is_file():
            raise UsageError(f"--prompt_template_name: no such template file {name_or_path!r}")
        return path.resolve()
    known = available_templates()
    if not NAME_RE.match(name_or_path) or name_or_path not in known:
        raise UsageError(
            f"--prompt_template_name: unknown template {name_or_path!r}; "
            f"choose one of {', '.join(known)} or give a path to a .json file"
        )
    path = (TEMPLATES_DIR / f"{name_or_path}.json").resolve()
    # Belt and braces: NAME_RE already rules out separators and dots.
    if path.parent != TEMPLATES_DIR:
        raise UsageError(f"--prompt_template_name: {name_or_path!r} escapes templates/")
    return path


def load_template(name_or_path: str = "alpaca") -> PromptTemplate:
    path = template_path(name_or_path)
    try:
        data = loads_json(path.read_text(encoding="utf-8"), f"template {path}")
    except UnicodeDecodeError:
        raise UsageError(f"template {path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UsageError(
            f"template {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    name = path.stem if path.parent == TEMPLATES_DIR else str(path)
    return parse_template(data, name, str(path))
