"""Reasoning Gym tasks: specs, options and reproducible train/held-out splits (a spec mixing
them with local files is built by :mod:`motg_fast.tasks.spec`).

A *task spec* is a comma-separated list of Reasoning Gym dataset names, each with an optional
sampling weight: ``"leg_counting"``, ``"acre:2,syllogism"``. The name of a preset stands for its
tasks: ``"paper"`` is the ten tasks of the paper (each weight 1).

*Task options* are a JSON object mapping a task name (or ``"*"`` for every task of the spec) to
that dataset's config options, e.g. ``{"leg_counting": {"max_animals": 3}}``; a task's own
options override the ``"*"`` ones. The extra option ``difficulty`` (an int ≥ 0) sets every
attribute of the dataset's Reasoning Gym curriculum to that level (0 = easiest; levels past an
attribute's last one use its last) before the explicit options are applied; under ``"*"`` it is
skipped for the few tasks that have no curriculum (e.g. ``acre``). ``seed`` and ``size`` are
not options: they come from the run's ``seed`` and ``dataset_size``.

**Split.** Each task is one Reasoning Gym dataset of ``size`` items generated with ``seed``; items
are generated lazily by index (Reasoning Gym derives item ``i`` from ``seed + i`` only, so the same
seed always gives the same items). The last ``ceil(heldout_fraction * size)`` indices are held out;
the others are training items. Training draws also skip any item whose question text equals a
held-out question, so the two sets never share a question even when a small task repeats itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

from reasoning_gym.factory import CURRICULA, DATASETS, create_curriculum

from .base import TaskItem

PAPER_TASKS: tuple[str, ...] = (
    "acre",
    "prime_factorization",
    "number_sequence",
    "graph_color",
    "color_cube_rotation",
    "circuit_logic",
    "family_relationships",
    "syllogism",
    "zebra_puzzles",
    "self_reference",
)
"""The ten Reasoning Gym tasks of the paper's runs."""

TASK_PRESETS: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS}
"""Named task lists usable in a task spec."""

_EXCLUDED = frozenset({"composite"})  # a mix of other datasets: use a weighted spec instead
_RESERVED_OPTIONS = {"seed": "--seed", "size": "--dataset_size"}
_MAX_REJECTIONS = 1000


def available_tasks() -> list[str]:
    """All Reasoning Gym dataset names usable as tasks, sorted."""
    return sorted(name for name in DATASETS if name not in _EXCLUDED)


def _unknown_task_error(name: str) -> ValueError:
    presets = ", ".join(TASK_PRESETS)
    return ValueError(
        f"unknown task {name!r}; valid tasks: {', '.join(available_tasks())} (presets: {presets})"
    )


def _parse_weight(token: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"bad weight {text!r} in task spec entry {token!r}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"task weight must be a positive number, got {text!r} in {token!r}")
    return weight


def parse_task_spec(spec: str, accept: Callable[[str], bool] | None = None) -> dict[str, float]:
    """Parse ``"acre:2,syllogism"`` (or a preset name) into ``{task: weight}`` in spec order.

    A preset entry (``paper`` or ``paper:3``) expands to its tasks, each with the entry's weight.
    A task named twice is an error. ``accept(name)`` admits names that are not Reasoning Gym
    tasks (e.g. files: :func:`motg_fast.tasks.spec.parse_spec`). Raises ``ValueError``
    naming the bad entry.
    """
    tokens = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in tokens):
        raise ValueError(f"empty entry in task spec {spec!r}")
    weights: dict[str, float] = {}
    valid = set(available_tasks())
    for token in tokens:
        name, _, weight_text = token.partition(":")
        name = name.strip()
        weight = _parse_weight(token, weight_text.strip()) if weight_text else 1.0
        names = TASK_PRESETS.get(name, (name,))
        for task in names:
            if task not in valid and not (accept is not None and accept(task)):
                raise _unknown_task_error(task)
            if task in weights:
                raise ValueError(f"task {task!r} appears twice in task spec {spec!r}")
            weights[task] = weight
    return weights


def read_task_options(options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The task options as a dict: a JSON object's text or a mapping (None or "": none)."""
    if options is None or options == "":
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as err:
            raise ValueError(f"task options are not valid JSON: {err}") from None
    if not isinstance(options, Mapping):
        raise ValueError('task options must be a JSON object like {"leg_counting": {...}}')
    return dict(options)


def parse_task_options(options: str | Mapping[str, Any] | None, tasks: list[str]) -> dict:
    """Parse the task-options JSON into ``{task: {option: value}}`` for the given tasks.

    ``"*"`` options apply to every task; a task's own options override them. Only checks the
    shape here; option names are checked against each dataset by :func:`dataset_config`.
    """
    options = read_task_options(options)
    for key, value in options.items():
        if key != "*" and key not in tasks:
            raise ValueError(
                f"task options name {key!r}, which is not a task of the spec ({', '.join(tasks)})"
            )
        if not isinstance(value, Mapping):
            raise ValueError(f"options for {key!r} must be a JSON object, got {value!r}")
    common = dict(options.get("*", {}))
    return {task: {**_broadcast(common, task), **options.get(task, {})} for task in tasks}


def _broadcast(common: dict[str, Any], task: str) -> dict[str, Any]:
    """The ``"*"`` options for ``task``: ``difficulty`` is skipped where it has no levels."""
    if "difficulty" in common and task not in CURRICULA:
        return {key: value for key, value in common.items() if key != "difficulty"}
    return common


def _curriculum_defaults(task: str, level: Any) -> dict[str, Any]:
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"task {task!r}: option 'difficulty' must be an int >= 0, got {level!r}")
    if task not in CURRICULA:
        raise ValueError(f"task {task!r} has no difficulty levels; set its options directly")
    curriculum = create_curriculum(task)
    curriculum.set_global_level(level)
    config = curriculum.generate_configuration({})
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def dataset_config(task: str, options: Mapping[str, Any], *, seed: int, size: int):
    """Build and validate the Reasoning Gym config object of ``task`` with ``options``.

    Raises ``ValueError`` naming the task and the bad option (unknown name, reserved name, or a
    value the dataset rejects).
    """
    if task not in DATASETS or task in _EXCLUDED:
        raise _unknown_task_error(task)
    config_cls = DATASETS[task][1]
    names = [f.name for f in dataclasses.fields(config_cls) if f.name not in _RESERVED_OPTIONS]
    kwargs: dict[str, Any] = {}
    options = dict(options)
    if "difficulty" in options:
        kwargs.update(_curriculum_defaults(task, options.pop("difficulty")))
    for key, value in options.items():
        if key in _RESERVED_OPTIONS:
            raise ValueError(
                f"task {task!r}: option {key!r} is set by {_RESERVED_OPTIONS[key]}, not by options"
            )
        if key not in names:
            raise ValueError(
                f"task {task!r} has no option {key!r}; its options: difficulty, {', '.join(names)}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(seed=seed, size=size)
    try:
        config = config_cls(**kwargs)
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"task {task!r}: bad options {options}: {detail}") from None
    return config


class ReasoningGymTask:
    """One Reasoning Gym dataset with its train/held-out split (see the module docstring):
    a :class:`~motg_fast.tasks.base.Task`."""

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        *,
        size: int,
        seed: int,
        heldout_fraction: float,
    ) -> None:
        if size < 2:
            raise ValueError(f"dataset size must be >= 2, got {size}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
        self.name = name
        self.options = dict(options)
        self.size = size
        self.seed = seed
        self.num_heldout = min(size - 1, math.ceil(heldout_fraction * size))
        self.num_train = size - self.num_heldout
        config = dataset_config(name, self.options, seed=seed, size=size)
        self.dataset = DATASETS[name][0](config=config)
        self._heldout_questions: frozenset[str] | None = None

    def item(self, index: int) -> TaskItem:
        """Item ``index`` of the whole dataset (train or held-out)."""
        if not 0 <= index < self.size:
            raise IndexError(f"task {self.name!r}: index {index} out of range [0, {self.size})")
        return TaskItem(self.name, index, self.dataset[index], self.dataset.score_answer)

    def heldout_indices(self) -> range:
        """Indices of the held-out items: the last ``num_heldout`` of the dataset."""
        return range(self.num_train, self.size)

    def heldout(self, limit: int | None = None) -> list[TaskItem]:
        """The first ``limit`` held-out items (all of them when ``limit`` is None)."""
        indices = self.heldout_indices()
        if limit is not None:
            indices = indices[:limit]
        return [self.item(i) for i in indices]

    def heldout_questions(self) -> frozenset[str]:
        """The question texts of all held-out items (generated once, then cached)."""
        if self._heldout_questions is None:
            self._heldout_questions = frozenset(item.question for item in self.heldout())
        return self._heldout_questions

    def sample_train(self, rng: random.Random) -> TaskItem:
        """A uniformly drawn training item whose question is not a held-out question."""
        blocked = self.heldout_questions()
        for _ in range(_MAX_REJECTIONS):
            item = self.item(rng.randrange(self.num_train))
            if item.question not in blocked:
                return item
        raise RuntimeError(
            f"task {self.name!r}: every drawn training question is also held out; "
            "raise dataset_size or change the task options"
        )

    def score_answer(self, answer: str | None, entry: dict) -> float:
        """The dataset's own ``score_answer`` (may raise on malformed text; see rewards)."""
        return self.dataset.score_answer(answer, entry)


__all__ = [
    "PAPER_TASKS",
    "TASK_PRESETS",
    "ReasoningGymTask",
    "available_tasks",
    "dataset_config",
    "parse_task_options",
    "parse_task_spec",
    "read_task_options",
]
