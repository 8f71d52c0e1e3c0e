"""Command lines generated from a config dataclass.

:func:`build_parser` makes one ``--name`` flag per dataclass field, typed from the annotation:
``int``/``float``/``str``; ``X | None`` (pass ``none`` for None); ``bool`` (``--name`` and
``--no-name``); ``tuple[float, float]`` (two values). The help text is the field's
``metadata["help"]``, with its default. :func:`parse_config` resolves, in order: the dataclass
defaults, ``--config FILE`` (a saved config JSON), ``--preset NAME``, then the explicit flags.
:func:`run_cli` turns the expected errors of a command into one ``error: …`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import PRESETS, Config


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return convert


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(annotation, False)``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation: Any) -> None:
    """Add the flag of one dataclass field (default suppressed: explicit flags are detectable)."""
    base, optional = _unwrap_optional(annotation)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = f.metadata.get("help", "")
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
    flag = "--" + f.name
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(flag, **kwargs)
        return
    if typing.get_origin(base) is tuple:
        item_types = typing.get_args(base)
        kwargs["nargs"] = len(item_types)
        kwargs["type"] = item_types[0]
        kwargs["metavar"] = tuple(f.name.upper() for _ in item_types)
        shown = " ".join(str(v) for v in default)
    elif base in (int, float, str):
        kwargs["type"] = _none_or(base) if optional else base
        shown = "none" if default is None else str(default)
    else:
        raise TypeError(f"field {f.name!r}: unsupported type {annotation!r} for the command line")
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if len(shown) > 60:
        shown = shown[:57] + "..."
    kwargs["help"] = f"{help_text} (default: {shown})".replace("%", "%%")
    parser.add_argument(flag, **kwargs)


def build_parser(
    config_cls: type = Config,
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
    *,
    prog: str | None = None,
    description: str | None = None,
    fields: Sequence[str] | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``config_cls`` plus ``--preset``/``--config``.

    ``fields`` restricts the flags to those names (all fields when None).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--preset",
        choices=list(presets),
        default=None,
        help="named set of values applied before the explicit flags",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a saved config JSON applied before --preset and the flags",
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if fields is None or f.name in fields:
            _add_field(parser, f, hints[f.name])
    return parser


def config_from_args(
    args: argparse.Namespace,
    config_cls: type = Config,
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
) -> Any:
    """Resolve a parsed namespace into a config: defaults < --config < --preset < flags."""
    values: dict[str, Any] = {}
    explicit = {k: v for k, v in vars(args).items() if k not in ("preset", "config")}
    if args.config:
        values.update(config_cls.load(args.config).to_dict())
    if args.preset:
        values.update(presets[args.preset])
    values.update(explicit)
    for f in dataclasses.fields(config_cls):
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return config_cls(**values)


def parse_config(
    argv: Sequence[str] | None = None,
    *,
    config_cls: type = Config,
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
    prog: str | None = None,
    description: str | None = None,
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a config (not yet validated)."""
    parser = build_parser(config_cls, presets, prog=prog, description=description)
    return config_from_args(parser.parse_args(argv), config_cls, presets)


def run_cli(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    expected: tuple[type[BaseException], ...] = (ValueError,),
) -> int:
    """Run ``main(argv)``; an ``expected`` error prints one ``error: …`` line and returns 2.

    Anything else propagates with its traceback (a bug, not a user error).
    """
    try:
        main(argv)
    except expected as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
