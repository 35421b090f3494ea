"""Command-line flags from config dataclasses: each field is one `--flag`, with its help text.

A config class declares its fields with `option(default, "help")`; `add_options` turns
them into argparse flags (`publish_every` -> `--publish-every`) and `from_options` builds
the dataclass back from the parsed namespace. The CLI parses once and passes the
dataclass down; nothing below the CLI reads flags or the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        kind = type(f.default) if f.default is not None else str
        if isinstance(f.default, Path):
            kind = Path
        parser.add_argument(
            flag, type=kind, default=f.default, help=help_text, choices=f.metadata.get("choices")
        )


def from_options(cls: type[T], namespace: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def load_callable(spec: str, where: str):
    """The callable `module:name` names (imported now); ValueError naming `where` (a flag,
    or a file and field) when it is malformed, cannot be imported or is not callable."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{where}: {spec!r} is not module:callable")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: cannot import {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{where}: {spec!r} is not callable")
    return fn
