"""Verifiable rewards: Reasoning Gym's `score_answer` on the `<answer>` text, plus format terms.

The completion is the model's text after the prompt's ``<think>``. For each completion:

- ``answer``: the text inside the last ``<answer>…</answer>`` (stripped), ``None`` if there is none;
- ``score``: the dataset's ``score_answer(answer, entry)`` clipped to [0, 1]; a missing answer, a
  scorer that raises, or a non-finite score gives 0 (a reward never crashes training); a
  scorer that raises is reported in ``scorer_error`` (the trainer counts and reports these);
- ``correct``: ``score == 1`` (what accuracy counts);
- ``think_closed``: the completion holds exactly one ``</think>``;
- ``answer_format``: after that ``</think>`` comes exactly one ``<answer>…</answer>`` and nothing
  but whitespace follows it;
- ``reward = correctness · s + think · think_closed + format · answer_format``, where ``s`` is
  ``score`` (partial credit, as the paper's runs used) or ``correct`` without partial credit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .prompting import ANSWER_END, ANSWER_START, THINK_END

_ANSWER_RE = re.compile(re.escape(ANSWER_START) + r"(.*?)" + re.escape(ANSWER_END), re.DOTALL)
_FORMAT_RE = re.compile(
    r"\s*"
    + re.escape(ANSWER_START)
    + r"(?:(?!"
    + re.escape(ANSWER_START)
    + r").)*?"
    + re.escape(ANSWER_END)
    + r"\s*\Z",
    re.DOTALL,
)

ScoreFn = Callable[[str | None, dict], float]


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms (paper: 2 × correctness with partial credit + format terms)."""

    correctness: float = 2.0
    think: float = 0.5
    format: float = 0.5
    partial_credit: bool = True


@dataclass(frozen=True)
class RewardResult:
    """The reward of one completion, with correctness reported apart from the shaped reward."""

    reward: float
    score: float
    correct: bool
    think_closed: bool
    answer_format: bool
    answer: str | None
    scorer_error: str | None = None  # "ValueError: …" when score_answer raised

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last ``<answer>…</answer>`` in ``completion``, or ``None``."""
    matches = _ANSWER_RE.findall(completion)
    return matches[-1].strip() if matches else None


def think_closed(completion: str) -> bool:
    """Whether the thinking phase was closed exactly once."""
    return completion.count(THINK_END) == 1


def answer_format_ok(completion: str) -> bool:
    """Exactly one ``</think>``, then exactly one ``<answer>…</answer>`` ending the completion."""
    if not think_closed(completion):
        return False
    after = completion.split(THINK_END, 1)[1]
    return after.count(ANSWER_START) == 1 and _FORMAT_RE.match(after) is not None


def safe_score(score_answer: ScoreFn, answer: str | None, entry: dict) -> float:
    """``score_answer(answer, entry)`` clipped to [0, 1]; 0 for no answer, an error or NaN."""
    return checked_score(score_answer, answer, entry)[0]


def checked_score(
    score_answer: ScoreFn, answer: str | None, entry: dict
) -> tuple[float, str | None]:
    """``(score, error)``: the score of :func:`safe_score`, and ``"Type: message"`` when the
    scorer raised (else None)."""
    if answer is None:
        return 0.0, None
    try:
        value = float(score_answer(answer, entry))
    except Exception as err:  # noqa: BLE001 - some Reasoning Gym scorers raise on malformed text
        return 0.0, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    if not math.isfinite(value):
        return 0.0, None
    return min(max(value, 0.0), 1.0), None


def score_completion(
    completion: str, entry: dict, score_answer: ScoreFn, weights: RewardWeights = RewardWeights()
) -> RewardResult:
    """Score one completion against a Reasoning Gym ``entry`` (see the module docstring)."""
    answer = extract_answer(completion)
    score, error = checked_score(score_answer, answer, entry)
    correct = score >= 1.0
    closed = think_closed(completion)
    formatted = answer_format_ok(completion)
    credit = score if weights.partial_credit else float(correct)
    reward = (
        weights.correctness * credit + weights.think * float(closed) + weights.format * formatted
    )
    return RewardResult(reward, score, correct, closed, formatted, answer, error)


def score_completions(
    completions: list[str],
    entries: list[dict],
    score_fns: list[ScoreFn],
    weights: RewardWeights = RewardWeights(),
) -> list[RewardResult]:
    """:func:`score_completion` over aligned lists of completions, entries and scorers."""
    if not len(completions) == len(entries) == len(score_fns):
        raise ValueError(
            f"lengths differ: {len(completions)} completions, {len(entries)} entries, "
            f"{len(score_fns)} scorers"
        )
    return [
        score_completion(c, e, f, weights)
        for c, e, f in zip(completions, entries, score_fns, strict=True)
    ]


def score_items(
    completions: list[str], items: list, task_set=None, weights: RewardWeights = RewardWeights()
) -> list[RewardResult]:
    """Score completions of :class:`~motg_fast.tasks.TaskItem` s: ``completions[n]`` answers
    ``items[n]``, scored by the ``score_answer`` of its own task (``task_set``'s when given,
    else the item's own).
    """
    if task_set is not None:
        scorers = [task_set.scorer(item.task) for item in items]
    else:
        scorers = [item.score_function() for item in items]
    return score_completions(completions, [item.entry for item in items], scorers, weights)
