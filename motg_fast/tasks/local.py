"""Your own data as a task: a JSON Lines, JSON, CSV or Parquet file, or a folder saved by
Hugging Face `datasets` (``save_to_disk``), loaded with the `datasets` library.

A task spec names the file by its path, beside Reasoning Gym tasks and with a weight like
them: ``--tasks basic_arithmetic:1,data/gsm_style.jsonl:2``. Its options go under that path
in ``--task_options``: ``question`` and ``answer`` (column names; by default the first of
:data:`QUESTION_COLUMNS` / :data:`ANSWER_COLUMNS` the file has), ``verifier`` (``exact``,
``math`` or ``module:function``: :mod:`motg_fast.tasks.verifiers`; default ``exact``) and
``split``.

**Split.** Held out are, in this order of precedence: the rows of the file's own test part
(a ``test`` split of a saved DatasetDict, or the rows whose ``split`` column says ``test``;
``split`` names another part or column value), else ``ceil(heldout_fraction · rows)`` rows
drawn with the run's seed (at least one, never all). Training rows whose question equals a
held-out question (after :func:`~motg_fast.tasks.verifiers.normalise`) are dropped, so the
two never share a question. The same file and seed give the same split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import TaskItem
from .verifiers import Verifier, normalise, resolve_verifier

SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
QUESTION_COLUMNS = ("question", "prompt", "problem", "input", "query")
ANSWER_COLUMNS = ("answer", "final_answer", "solution", "target", "output", "label")
OPTIONS = ("question", "answer", "verifier", "split")
SPLIT_COLUMN = "split"


def is_local_task(name: str) -> bool:
    """Whether a task-spec entry names a file or folder rather than a Reasoning Gym task."""
    return (
        "/" in name or "\\" in name or Path(name).suffix in SUFFIX_BUILDERS or Path(name).exists()
    )


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the local task ``name`` (one-line ``ValueError`` for an unknown one)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"task {name}: unknown option(s) {', '.join(unknown)}; a file's options are "
            f"{', '.join(OPTIONS)}"
        )
    return dict(options)


def check_path(name: str) -> Path:
    """The path of a local task, which must exist and be a known format."""
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"task file {name} not found")
    if path.is_file() and path.suffix not in SUFFIX_BUILDERS:
        raise ValueError(
            f"task file {name}: unknown format {path.suffix!r} (use "
            f"{', '.join(SUFFIX_BUILDERS)}, or a folder saved by datasets' save_to_disk)"
        )
    return path


def load_parts(name: str) -> dict[str, list[dict]]:
    """The rows of a local task by part (``{"train": rows}``, plus ``"test"`` etc. for a
    saved DatasetDict)."""
    import datasets

    path = check_path(name)
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            builder = SUFFIX_BUILDERS[path.suffix]
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - any parse failure names the file
        message = " ".join(str(err).split())[:300]
        raise ValueError(f"task file {name} cannot be read: {message}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {part: list(rows) for part, rows in loaded.items()}
    return {"train": list(loaded)}


def _column(name: str, rows: list[dict], option: str | None, candidates: tuple[str, ...]) -> str:
    columns = list(rows[0])
    if option is not None:
        if option not in columns:
            raise ValueError(f"task file {name} has no column {option!r} (columns: {columns})")
        return option
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"task file {name}: none of the columns {columns} is one of {list(candidates)}; "
        'name it in --task_options, e.g. {"' + name + '": {"question": "..."}}'
    )


def _entry(name: str, row: dict, number: int, question: str, answer: str) -> dict:
    for column in (question, answer):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            kind = "question" if column == question else "answer"
            raise ValueError(f"task file {name}: row {number} has no {kind} in column {column!r}")
    return {**row, "question": str(row[question]), "answer": str(row[answer])}


class LocalTask:
    """Rows of a local file as a :class:`~motg_fast.tasks.base.Task` (see the module
    docstring), scored by a verifier of :mod:`motg_fast.tasks.verifiers`."""

    def __init__(
        self, name: str, options: Mapping[str, Any], *, seed: int, heldout_fraction: float
    ) -> None:
        options = check_options(name, options)
        self.name = name
        self.verifier_name = str(options.get("verifier", "exact"))
        self.verifier: Verifier = resolve_verifier(self.verifier_name)
        parts = load_parts(name)
        if not any(parts.values()):
            raise ValueError(f"task file {name} has no rows")
        first = next(rows for rows in parts.values() if rows)
        question = _column(name, first, options.get("question"), QUESTION_COLUMNS)
        answer = _column(name, first, options.get("answer"), ANSWER_COLUMNS)
        entries = {
            part: [_entry(name, row, i, question, answer) for i, row in enumerate(rows)]
            for part, rows in parts.items()
        }
        train, heldout = self._split(entries, options.get("split"), seed, heldout_fraction)
        blocked = {normalise(e["question"]) for e in heldout}
        self.train_entries = [e for e in train if normalise(e["question"]) not in blocked]
        self.heldout_entries = heldout
        if not self.train_entries:
            raise ValueError(f"task file {name}: no training row is left after the held-out split")
        self._check_verifier(self.heldout_entries[0])

    def _split(self, parts: dict[str, list[dict]], split: str | None, seed: int, fraction: float):
        name = split or "test"
        if name in parts and len(parts) > 1:  # a saved DatasetDict with that part
            held = parts[name]
            train = [e for part, rows in parts.items() if part != name for e in rows]
            if held:
                return train, held
        rows = [e for rows in parts.values() for e in rows]
        if SPLIT_COLUMN in rows[0]:
            held = [e for e in rows if str(e.get(SPLIT_COLUMN)) == name]
            if held:
                return [e for e in rows if str(e.get(SPLIT_COLUMN)) != name], held
        if split is not None:
            raise ValueError(f"task file {self.name}: no part or {SPLIT_COLUMN!r} value {split!r}")
        if len(rows) < 2:
            raise ValueError(f"task file {self.name} has one row: nothing left to train on")
        count = min(len(rows) - 1, max(1, math.ceil(fraction * len(rows))))
        order = list(range(len(rows)))
        random.Random(f"{seed}:{self.name}").shuffle(order)
        chosen = set(order[:count])
        held = [rows[i] for i in sorted(chosen)]
        return [rows[i] for i in range(len(rows)) if i not in chosen], held

    def _check_verifier(self, entry: dict) -> None:
        """The verifier must score the reference answer of a held-out row, at once."""
        try:
            scores = self.score_batch([entry["answer"]], [entry])
        except Exception as err:  # noqa: BLE001 - named in one line
            raise ValueError(
                f"task file {self.name}: verifier {self.verifier_name!r} raised on its first "
                f"held-out row: {type(err).__name__}: {err}"
            ) from None
        if len(scores) != 1:
            raise ValueError(
                f"task file {self.name}: verifier {self.verifier_name!r} returned "
                f"{len(scores)} scores for one completion"
            )

    def score_batch(self, completions: list[str | None], entries: list[dict]) -> list[float]:
        """The verifier over aligned completions and entries (TRL's keyword convention)."""
        columns = {key: [e.get(key) for e in entries] for key in entries[0]}
        columns["prompts"] = [e["question"] for e in entries]
        answers = columns.pop("answer")
        return [float(s) for s in self.verifier(completions=completions, answer=answers, **columns)]

    def _item(self, entries: list[dict], index: int, offset: int) -> TaskItem:
        return TaskItem(self.name, offset + index, entries[index], self.score_answer)

    def heldout(self, limit: int | None = None) -> list[TaskItem]:
        """The first ``limit`` held-out rows (all when None), in file order."""
        total = len(self.heldout_entries)
        count = total if limit is None else min(limit, total)
        offset = len(self.train_entries)
        return [self._item(self.heldout_entries, i, offset) for i in range(count)]

    def sample_train(self, rng: random.Random) -> TaskItem:
        """A uniformly drawn training row."""
        return self._item(self.train_entries, rng.randrange(len(self.train_entries)), 0)

    def score_answer(self, answer: str | None, entry: dict) -> float:
        """The verifier's score of one answer (0 without an answer)."""
        if answer is None:
            return 0.0
        return self.score_batch([answer], [entry])[0]
