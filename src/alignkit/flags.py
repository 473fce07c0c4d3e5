"""Typer commands built from config dataclasses: one declaration per flag (see `config.knob`).

`command_from(cls, run)` returns a typer-ready function whose options are the fields of `cls` (help text,
default, allowed values and aliases from each field's declaration), plus `--config FILE.yaml` and `--verbose`.
It builds the config with `config.load_config` (every value checked, then `cls.validate()`) before calling
`run(config)`, so bad flags fail before any model or data loads. Stdlib + typer only: `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Callable, Optional

import typer

from alignkit.config import _kind, allowed_text, load_config, value_switches
from alignkit.progress import configure_logging

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)
# every typer app of alignkit: -h as well as --help; plain help text (rich's boxes cut long flag names to fit 80 columns)
APP_SETTINGS = {"context_settings": {"help_option_names": ["-h", "--help"]}, "rich_markup_mode": None}


def fail(error: Exception) -> None:
    """`error: MESSAGE` on stderr and exit code 2: a user error, not a bug, so no traceback."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _help(f: dataclasses.Field) -> str:
    allowed = allowed_text(f)
    default = f.default if f.default is not dataclasses.MISSING else None
    parts = [f.metadata.get("help", "")]
    if allowed:
        parts.append(f"[{allowed}]")
    if f.metadata.get("required"):
        parts.append("[required]")
    elif default not in (None, ""):
        parts.append(f"[default: {default!r}]")
    return " ".join(p for p in parts if p)


def _param(name: str, annotation, option) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)


def command_from(cls: type, run: Callable, help: str | None = None) -> Callable:
    """A typer command function with one option per field of `cls`; it calls `run(load_config(cls, ...))`."""
    hints = typing.get_type_hints(cls)
    params = []
    positional = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    for f in positional:  # `alignkit serve MODEL`: the same field as --model_name_or_path, given without its flag
        argument = typer.Argument(None, metavar=f.metadata["positional"], help=f"same as --{f.name}", show_default=False)
        params.append(_param(f"positional__{f.name}", Optional[str], argument))
    for f in dataclasses.fields(cls):
        kind, _ = _kind(hints[f.name])
        aliases = list(f.metadata.get("aliases", ()))
        if kind is bool:
            decls = [f"--{f.name}/--no_{f.name}"] + [f"{a}/--no_{a.lstrip('-')}" for a in aliases]
        else:
            decls = [f"--{f.name}", *aliases]
        option = typer.Option(None, *decls, help=_help(f), show_default=False, envvar=f.metadata.get("envvar") or None)
        if kind is list:  # given several times, kept as a list
            annotation = Optional[hints[f.name]]
        else:
            annotation = Optional[list[kind]] if f.metadata.get("repeatable") else Optional[kind]
        params.append(_param(f.name, annotation, option))
    switches = value_switches(cls)
    for switch, (f, value) in switches.items():
        option = typer.Option(False, f"--{switch}", help=f"same as --{f.name} {value}", show_default=False)
        params.append(_param(f"switch__{switch}", bool, option))
    config_help = "YAML file whose keys are these flag names (without dashes); flags override it"
    params.append(_param("config", Optional[str], typer.Option(None, "--config", help=config_help)))
    params.append(_param("verbose", bool, typer.Option(False, "--verbose", help="show transformers / HF hub info logs and progress bars")))

    def command(**kwargs):
        configure_logging(kwargs.pop("verbose"))
        config_file = kwargs.pop("config")
        try:
            for f in positional:
                given = kwargs.pop(f"positional__{f.name}")
                if given is not None and kwargs.get(f.name) not in (None, given):
                    raise ValueError(f"{f.metadata['positional']} {given} and --{f.name} {kwargs[f.name]} both name the {f.name}: give one")
                if given is not None:
                    kwargs[f.name] = given
            for switch, (f, value) in switches.items():
                if kwargs.pop(f"switch__{switch}"):
                    if kwargs.get(f.name) not in (None, value):
                        raise ValueError(f"--{switch} means --{f.name} {value}, but --{f.name} {kwargs[f.name]} was also given")
                    kwargs[f.name] = value
            for f in dataclasses.fields(cls):
                if kwargs.get(f.name) == []:  # typer gives [] for a list flag that was not given
                    kwargs[f.name] = None
                elif f.metadata.get("repeatable") and kwargs.get(f.name) is not None:
                    kwargs[f.name] = ",".join(kwargs[f.name])
            config = load_config(cls, config_file, kwargs)
            run(config)
        except USER_ERRORS as error:
            fail(error)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help or cls.__doc__
    command.__name__ = cls.__name__
    return command
