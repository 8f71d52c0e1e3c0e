"""Verifiers for tasks from your own data, in TRL's reward-function convention.

A verifier is ``fn(completions, answer, **columns) -> list[float]``: ``completions`` are the
answers to score, ``answer`` the reference answers, and every other column of the rows comes
as a keyword list of the same length (``prompts`` too), so one function serves both
motg_fast's trainer and TRL's ``GRPOTrainer`` (``reward_funcs=[fn]``). Scores are in [0, 1]
(1: correct). motg_fast passes the text inside the completion's last ``<answer>…</answer>``
(the format terms of the reward are added on top); TRL passes the whole completion, which
:func:`math_equivalent` handles too (it reads the last expression or ``\\boxed{}``).

Built in: ``exact`` (:func:`exact_match`) and ``math`` (:func:`math_equivalent`, Hugging
Face's `math-verify`); any other is named ``module:function`` and imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Verifier = Callable[..., list[float]]
"""``fn(completions, answer, **columns) -> list[float]`` (see the module docstring)."""

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def normalise(text: str) -> str:
    """Case-folded text without surrounding whitespace, ``$`` or a final period, inner
    whitespace collapsed, and thousands separators dropped from numbers (``1,000`` → ``1000``).
    """
    text = " ".join(str(text).split()).strip().strip("$").strip().rstrip(".").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", text):
        text = text.replace(",", "")
    return text.casefold()


def _same(answer: str, reference: str) -> bool:
    a, b = normalise(answer), normalise(reference)
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        return float(a) == float(b)  # 3.0 and 3, 1e3 and 1000
    return False


def exact_match(completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where a completion equals its reference after :func:`normalise` (numbers compare
    by value), else 0.0."""
    return [float(c is not None and _same(c, a)) for c, a in zip(completions, answer, strict=True)]


def math_equivalent(completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where `math-verify` finds a completion mathematically equal to its reference
    (LaTeX, fractions, decimals, ``\\boxed{}``, equivalent expressions), else 0.0."""
    from math_verify import verify

    scores = []
    for completion, reference in zip(completions, answer, strict=True):
        gold = _parse_math(reference)
        guess = _parse_math(completion) if completion is not None else []
        scores.append(float(bool(gold) and bool(guess) and verify(gold, guess)))
    return scores


def _parse_math(text: str) -> list:
    """math-verify's parse of ``text`` read as math (``$…$`` added unless it has ``$`` or a
    backslash), falling back to its plain-text extraction."""
    from math_verify import parse

    text = str(text).strip()
    marked = text if ("$" in text or "\\" in text) else f"${text}$"
    return parse(marked) or parse(text)


BUILTIN: dict[str, Verifier] = {"exact": exact_match, "math": math_equivalent}


def resolve_verifier(name: str) -> Verifier:
    """The verifier named ``exact``, ``math`` or ``module:function`` (a one-line
    ``ValueError`` when it cannot be imported or is not callable)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"verifier {name!r} is neither {', '.join(BUILTIN)} nor a 'module:function' path"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise ValueError(f"verifier {name!r} cannot be imported: {err}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ValueError(f"verifier {name!r}: module {module_name!r} has no function {attribute!r}")
    return fn
