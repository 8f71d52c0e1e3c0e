"""The `Task` protocol and a weighted mix of tasks: what training and evaluation need of a
source of questions.

A task gives training items (`sample_train`), a fixed held-out split (`heldout`) that never
shares a question with training, and a verifier (`score_answer(answer, entry) → [0, 1]`);
every item carries its task's verifier, so a mix scores each completion with its own.
Reasoning Gym datasets are one implementation (`motg_fast.tasks.reasoning_gym`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

ScoreFn = Callable[[str | None, dict], float]
"""A verifier: `score_answer(answer, entry)` in [0, 1] (1: correct)."""


@dataclass(frozen=True)
class TaskItem:
    """One question of one task, with its verifier.

    `entry` is the task's record: `question`, and `answer` (the reference answer; `None` for
    tasks that accept many answers and score through the entry's metadata).
    """

    task: str
    index: int
    entry: dict = field(repr=False, compare=False)
    scorer: ScoreFn = field(repr=False, compare=False)

    @property
    def question(self) -> str:
        """The question text shown to the model."""
        return self.entry["question"]

    @property
    def answer(self) -> str | None:
        """The reference answer (`None` where the entry's metadata holds it)."""
        return self.entry.get("answer")


@runtime_checkable
class Task(Protocol):
    """A source of questions with a train/held-out split and a verifier."""

    name: str

    def sample_train(self, rng: random.Random) -> TaskItem:
        """One training item, drawn with `rng`, whose question is not held out."""
        ...

    def heldout(self, limit: int | None = None) -> list[TaskItem]:
        """The first `limit` held-out items, in a fixed order (all when None)."""
        ...

    def score_answer(self, answer: str | None, entry: dict) -> float:
        """The score of `answer` for `entry` in [0, 1] (may raise on malformed text)."""
        ...


class TaskSet:
    """A weighted mix of tasks with reproducible, disjoint train and held-out items.

    Training draws pick a task with probability proportional to its weight, then a training item
    of it uniformly (:meth:`sample_train`). Held-out evaluation takes the same number of items
    from every task (:meth:`heldout`), whatever the weights.
    """

    def __init__(self, tasks: Mapping[str, Task], weights: Mapping[str, float]) -> None:
        self.tasks = dict(tasks)
        self.weights = {name: float(weights[name]) for name in self.tasks}

    @property
    def names(self) -> list[str]:
        """Task names in spec order."""
        return list(self.tasks)

    def sample_train(self, n: int, rng: random.Random) -> list[TaskItem]:
        """``n`` training items drawn with replacement from the weighted mix."""
        names = rng.choices(self.names, weights=[self.weights[t] for t in self.names], k=n)
        return [self.tasks[name].sample_train(rng) for name in names]

    def heldout(self, per_task: int | None = None) -> list[TaskItem]:
        """Up to ``per_task`` held-out items of every task, task by task."""
        return [item for task in self.tasks.values() for item in task.heldout(per_task)]

    def scorer(self, task: str) -> ScoreFn:
        """The verifier of ``task``."""
        return self.tasks[task].score_answer
