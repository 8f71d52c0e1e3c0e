"""Verifiable rewards: the task's verifier on the `<answer>` text, plus format terms; and the
reward functions the trainer calls, which never crash a run.

The completion is the model's text after the prompt's ``<think>``. For each completion:

- ``answer``: the text inside the last ``<answer>…</answer>`` (stripped), ``None`` if there is none;
- ``score``: the task's ``score_answer(answer, entry)`` clipped to [0, 1]; a missing answer, a
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

from tqdm.auto import tqdm

from .base import ScoreFn, TaskItem
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

# (completions, items) -> (rewards, correct) or (rewards, correct, a RewardReport / failures)
RewardFn = Callable[[list[str], list], tuple]


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms. The defaults are the one default of the command line,
    the config and the examples: 2 × the score (partial credit) + 0.25 × the full answer
    format, nothing for closing ``</think>`` (a format-only completion earns at most a
    ninth of a correct one). The paper preset's are 2, 0.5 and 0.5."""

    correctness: float = 2.0
    think: float = 0.0
    format: float = 0.25
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
    """Score one completion against a task ``entry`` (see the module docstring)."""
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
    completions: list[str], items: list[TaskItem], weights: RewardWeights = RewardWeights()
) -> list[RewardResult]:
    """Score completions of task items: ``completions[n]`` answers ``items[n]``, scored by
    the verifier of its own task (``item.scorer``)."""
    scorers = [item.scorer for item in items]
    return score_completions(completions, [item.entry for item in items], scorers, weights)


@dataclass(frozen=True)
class RewardReport:
    """What a reward function may return third: its own failures (e.g. verifiers that raised)
    and which completions earned only the format reward (None: unknown)."""

    failures: int = 0
    format_only: list[bool] | None = None


def task_reward(weights: RewardWeights) -> RewardFn:
    """Reward function over (completions, items): shaped reward, correctness (0/1) and a
    `RewardReport` (verifiers that raised, scored 0 and reported in one line)."""

    def reward(completions: list[str], items: list) -> tuple:
        results = score_items(completions, items, weights)
        errors = [(item.task, r.scorer_error) for item, r in zip(items, results) if r.scorer_error]
        if errors:
            task, error = errors[0]
            tqdm.write(
                f"warning: {len(errors)} answer(s) made a verifier raise, scored 0 "
                f"(first: {task}: {error})"
            )
        report = RewardReport(
            failures=len(errors),
            format_only=[r.score == 0 and (r.think_closed or r.answer_format) for r in results],
        )
        return [r.reward for r in results], [float(r.correct) for r in results], report

    return reward


def safe_rewards(reward_fn: RewardFn, completions: list[str], items: list):
    """Rewards that never kill training: a raising or malformed reward scores 0 (and says so).

    Returns `(rewards, correct, report)`. A reward function returns `(rewards, correct)`, or
    a third value: a `RewardReport`, or an int of failures of its own (added to
    `report.failures`, which is 1 when the function itself raised).
    """
    try:
        rewards, correct, *extra = reward_fn(completions, items)
        rewards = [float(r) for r in rewards]
        correct = [float(c) for c in correct]
        if len(rewards) != len(completions) or len(correct) != len(completions):
            raise ValueError("reward function returned the wrong number of values")
        clean = [r if r == r and abs(r) != float("inf") else 0.0 for r in rewards]
        report = extra[0] if extra else RewardReport()
        if not isinstance(report, RewardReport):
            report = RewardReport(failures=int(report))
        return clean, correct, report
    except Exception as exc:  # noqa: BLE001 - a broken reward must never end a run
        tqdm.write(f"warning: reward function raised {type(exc).__name__}: {exc}; scoring 0")
        return [0.0] * len(completions), [0.0] * len(completions), RewardReport(failures=1)
