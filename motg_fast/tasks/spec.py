"""A task spec of Reasoning Gym tasks and local files, mixed: ``"basic_arithmetic:1,
data/gsm_style.jsonl:2"``. Reasoning Gym entries follow
:mod:`motg_fast.tasks.reasoning_gym`, files :mod:`motg_fast.tasks.local`; ``--task_options``
holds both (a file's options under its path; ``"*"`` applies to Reasoning Gym tasks only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import local, reasoning_gym
from .base import TaskSet


def parse_spec(spec: str) -> dict[str, float]:
    """``{task: weight}`` in spec order, files admitted beside Reasoning Gym names."""
    return reasoning_gym.parse_task_spec(spec, accept=local.is_local_task)


def split_options(
    options: str | Mapping[str, Any] | None, names: list[str]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(reasoning_gym_options, file_options)``: each task's options, by task name."""
    gym_names = set(reasoning_gym.available_tasks())  # a Reasoning Gym name stays one, even
    files = [name for name in names if name not in gym_names]  # beside a same-named file
    gym = [name for name in names if name not in files]
    options = reasoning_gym.read_task_options(options)
    file_options = {}
    for name in files:
        value = options.pop(name, {})
        if not isinstance(value, Mapping):
            raise ValueError(f"options for {name!r} must be a JSON object, got {value!r}")
        file_options[name] = local.check_options(name, value)
    if not gym:
        options.pop("*", None)
    return reasoning_gym.parse_task_options(options, gym), file_options


def check_tasks(spec: str, options: str | Mapping[str, Any] | None = None) -> None:
    """Validate a spec and its options without reading a file's rows or generating an item:
    unknown tasks, missing files, unknown formats and options, verifiers that do not import."""
    from .verifiers import resolve_verifier

    names = list(parse_spec(spec))
    gym_options, file_options = split_options(options, names)
    for name, values in gym_options.items():
        reasoning_gym.dataset_config(name, values, seed=0, size=2)
    for name, values in file_options.items():
        local.check_path(name)
        resolve_verifier(str(values.get("verifier", "exact")))


def build_tasks(
    spec: str,
    options: str | Mapping[str, Any] | None = None,
    *,
    size: int = 10_000,
    seed: int = 42,
    heldout_fraction: float = 0.01,
) -> TaskSet:
    """The :class:`TaskSet` of a spec: Reasoning Gym datasets of ``size`` items and files
    (all their rows), each with its held-out split; one-line ``ValueError`` for bad input."""
    weights = parse_spec(spec)
    gym_options, file_options = split_options(options, list(weights))
    tasks = {}
    for name in weights:
        if name in file_options:
            tasks[name] = local.LocalTask(
                name, file_options[name], seed=seed, heldout_fraction=heldout_fraction
            )
        else:
            tasks[name] = reasoning_gym.ReasoningGymTask(
                name, gym_options[name], size=size, seed=seed, heldout_fraction=heldout_fraction
            )
    return TaskSet(tasks, weights)
