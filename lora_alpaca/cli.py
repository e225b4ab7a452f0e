"""Turn a config dataclass into a click command (litgpt-style: the dataclass is the single
source of defaults and `--help`).

Every script defines one `@dataclass` whose fields carry `help` (and optionally `choices`,
`aliases`) in their metadata. `build_command` makes one click option per field, plus
`--config FILE.yaml` (any field; flags given on the command line override the file) and
`--debug` (show tracebacks). alpaca-lora users typed fire-style values, so booleans accept
`--flag`, `--flag true|false|True|False|1|0` and lists accept `a,b` or `'[a,b]'`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lora_alpaca.errors import EXIT_USAGE, UsageError

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def field(
    default: Any,
    help: str,
    choices: list[str] | None = None,
    aliases: tuple = (),
    tags: tuple = (),
):
    """A dataclass field with the metadata `build_command` reads. `tags` mark what a setting
    is (e.g. "lora": part of the adapter's recipe; "resume": changing it makes a resumed run
    a different run), so such lists are read off the dataclass instead of kept by hand."""
    meta = {"help": help, "choices": choices, "aliases": aliases, "tags": tags}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def tagged_fields(cls, tag: str) -> tuple[str, ...]:
    """Names of `cls`'s fields carrying `tag`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if tag in f.metadata.get("tags", ()))


class BoolParam(click.ParamType):
    name = "true|false"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        self.fail(f"{value!r} is not a boolean; use true or false", param, ctx)


class ListParam(click.ParamType):
    """`q_proj,v_proj`, `[q_proj,v_proj]`, `["q_proj", "v_proj"]` or a YAML list."""

    name = "a,b,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            items = [str(v) for v in value]
        else:
            text = str(value).strip().strip("[]")
            items = [p.strip().strip("'\"") for p in text.split(",")]
        items = [i for i in items if i]
        if not items:
            self.fail("needs at least one item", param, ctx)
        return items


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _param_type(f: dataclasses.Field, tp: Any) -> click.ParamType:
    if f.metadata.get("choices"):
        return click.Choice(f.metadata["choices"], case_sensitive=False)
    if tp is bool:
        return BoolParam()
    if tp is int:
        return click.INT
    if tp is float:
        return click.FLOAT
    if typing.get_origin(tp) is list:
        return ListParam()
    return click.STRING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def load_yaml_config(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config: no such file {path!r}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}"
        )
    return data


def resolve_config(cls: type, cli_values: dict, explicit: set[str], config_file: str | None):
    """defaults <- YAML file <- flags typed on the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {name: _default(f) for name, f in fields.items()}
    if config_file:
        data = load_yaml_config(config_file)
        alias_to_name = {a.lstrip("-"): n for n, f in fields.items() for a in f.metadata["aliases"]}
        unknown = [k for k in data if k not in fields and k not in alias_to_name]
        if unknown:
            raise UsageError(
                f"--config {config_file}: unknown key(s) {', '.join(map(str, unknown))}; "
                f"allowed: {', '.join(fields)}"
            )
        for key, raw in data.items():
            name = alias_to_name.get(key, key)
            tp, optional = _unwrap(hints[name])
            if raw is None and optional:
                values[name] = None
                continue
            try:
                values[name] = _param_type(fields[name], tp).convert(raw, None, None)
            except click.BadParameter as e:
                raise UsageError(f"--config {config_file}: {name}: {e.message}") from None
    for name in explicit:
        values[name] = cli_values[name]
    return cls(**values)


def build_command(cls: type, main: Callable[[Any], int | None], help: str) -> click.Command:
    """A click command whose options are the fields of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    params: list[click.Parameter] = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        ptype = _param_type(f, tp)
        default = _default(f)
        shown = ",".join(default) if isinstance(default, list) else default
        decls = [f"--{f.name}", *f.metadata["aliases"], f.name]
        kwargs: dict[str, Any] = dict(type=ptype, default=shown, help=f.metadata["help"])
        kwargs["show_default"] = shown not in (None, "")
        if tp is bool:
            # `--flag` alone means true; `--flag false` also works (fire-style).
            kwargs.update(is_flag=False, flag_value="true")
        params.append(click.Option(decls, **kwargs))
    params.append(
        click.Option(
            ["--config"],
            type=str,
            default=None,
            help="YAML file of flag: value pairs (any flag above). Flags on the command line win.",
        )
    )
    params.append(click.Option(["--debug"], is_flag=True, help="Show full tracebacks for errors."))

    def callback(config: str | None, debug: bool, **kwargs):
        ctx = click.get_current_context()
        explicit = {
            name
            for name in kwargs
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        }
        cfg = resolve_config(cls, kwargs, explicit, config)
        return main(cfg)

    return click.Command(
        name=Path(sys.argv[0]).name,
        params=params,
        callback=callback,
        help=help,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )


def run(command: click.Command, argv: list[str] | None = None) -> None:
    """Run a command; user mistakes become one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Nothing the tools write may be world-writable, even under `umask 000` on a shared box.
    # Tightening the umask once here covers our files and everything the libraries write
    # (datasets cache, save_pretrained, gradio temp files); a stricter user umask is kept.
    os.umask(os.umask(0o022) | 0o002)
    debug = "--debug" in argv or os.environ.get("LORA_ALPACA_DEBUG") == "1"
    try:
        rc = command.main(argv, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # pragma: no cover - not used
        click.echo(e.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as e:
        if debug:
            raise
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(EXIT_USAGE)
    except UsageError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(rc or 0)
