"""Command lines generated from the config parts, with transformers' ``HfArgumentParser``.

A command names the parts it uses (:data:`motg_fast.config.PARTS`) and any dataclass of its
own options; every field of those is a ``--name`` flag (``--name-with-dashes`` too) with the
field's type, default and help text, as TRL's scripts do: ``X | None`` takes ``none`` for
None; a ``bool`` takes ``--name``, ``--name false`` or ``--no_name``; a list takes several
values (``--betas 0.9 0.99``). :func:`parse_config` resolves, in order: the defaults,
``--config FILE`` (a YAML or JSON file of ``field: value``, e.g. a saved ``config.json``),
``--preset NAME``, ``--method NAME``, then the explicit flags; values of the first three for
fields of parts the command does not use are ignored. Each part is validated when parsed: a
bad flag or value is one ``error: …`` line (exit 2); :func:`run_cli` does the same for a
command's expected errors.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import HfArgumentParser

from .config import FIELD_PART, PARTS, Config
from .kernels.spec import METHODS
from .presets import PRESETS, method_values, read_config_file


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, the description (with its examples) printed as written."""


class _OneLineParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose errors are one line, not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return convert


def _optional_fields(classes: Sequence[type]) -> set[str]:
    """Names of the fields typed ``X | None``."""
    optional = set()
    for cls in classes:
        for name, hint in typing.get_type_hints(cls).items():
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            if union and type(None) in typing.get_args(hint):
                optional.add(name)
    return optional


def build_parser(
    classes: Sequence[type],
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> HfArgumentParser:
    """The parser: one flag per field of ``classes`` plus ``--preset`` and ``--config``."""
    parser = _OneLineParser(
        list(classes),
        prog=prog,
        usage="%(prog)s [options]",  # the description's examples come right after it
        description=description,
        formatter_class=_Formatter,
    )
    optional = _optional_fields(classes)
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _none_or(action.type)
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
        help="a YAML or JSON file of field: value (e.g. a run's config.json), applied first",
    )
    return parser


def _file_and_preset(
    parser: HfArgumentParser, argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The values of ``--config FILE``, ``--preset NAME``, then ``--method NAME`` (later
    wins; explicit flags come after all three)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    first.add_argument("--preset", default=None, choices=list(presets))
    first.add_argument("--method", default=None, choices=list(METHODS))
    first.error = parser.error
    known, _ = first.parse_known_args(argv)
    values: dict[str, Any] = {}
    if known.config:
        values.update(read_config_file(known.config))
    if known.preset:
        values.update(presets[known.preset])
    if known.method:
        values.update(method_values(known.method))
    return values


def parse_config(
    argv: Sequence[str] | None = None,
    *,
    parts: Sequence[str] = tuple(PARTS),
    extras: Sequence[type] = (),
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
    prog: str | None = None,
    description: str | None = None,
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a :class:`Config` of ``parts`` (and,
    with ``extras``, ``(config, *extra objects)``), every part validated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = [PARTS[name] for name in parts] + list(extras)
    parser = build_parser(classes, presets, prog=prog, description=description)
    values = _file_and_preset(parser, argv, presets)
    names = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - names - set(FIELD_PART))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    parser.set_defaults(**{k: v for k, v in values.items() if k in names})
    *objects, _, unknown_flags = parser.parse_args_into_dataclasses(  # _: --preset, --config
        argv, return_remaining_strings=True
    )
    if unknown_flags:
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags)}")
    config = Config.of(**dict(zip(parts, objects[: len(parts)], strict=True)))
    return (config, *objects[len(parts) :]) if extras else config


def quiet_transformers() -> None:
    """No per-run noise from transformers on the command line: its progress bars (weights
    loading, shard writing) and info logs off; warnings and errors still show."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_warning()


# glibc's mallopt parameter and the size from which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_memory() -> bool:
    """Give large freed blocks back to the system at once (glibc only; False elsewhere).

    glibc raises its mmap threshold after each large free, so the activations and KV caches
    of later steps come from the heap, which fragments: the default job's resident memory
    kept growing from step to step. A fixed threshold (glibc's own default, 128
    KiB, as ``MALLOC_MMAP_THRESHOLD_=131072`` would set) maps every large tensor on its own
    and unmaps it when freed.
    """
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False


def run_cli(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    expected: tuple[type[BaseException], ...] = (ValueError,),
) -> int:
    """Run ``main(argv)``; an ``expected`` error prints one ``error: …`` line and returns 2.

    Anything else propagates with its traceback (a bug, not a user error).
    """
    quiet_transformers()
    return_freed_memory()
    try:
        main(argv)
    except expected as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        hint = f": {interrupt}" if str(interrupt) else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    return 0
