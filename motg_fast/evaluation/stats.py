"""Bootstrap confidence intervals for held-out accuracies and their differences.

Held-out results are per-question values (the fraction of a question's samples that are
correct, or whether any of them is: pass@k). Questions are the unit that is resampled:
samples of one question are not independent of each other.

- :func:`bootstrap_ci`: percentile bootstrap of the mean of one set of values, e.g. the
  per-question gains of one run (after − before, paired by question).
- :func:`nested_bootstrap_ci`: values grouped by seed (each seed its own run, and here its own
  held-out questions): resample the seeds, then the questions inside each drawn seed, so
  the interval carries both the run-to-run and the question-to-question variation. Paired
  differences between two arms (same seed, same questions) go in the same way. Resampling
  at both levels counts the question variation twice when seeds agree, so the interval is
  conservative then (wider than nominal); with few seeds that is the safe side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate (the plain mean) and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        """A JSON-ready dict."""
        return asdict(self)

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``0.250 [0.180, 0.320]`` (``+0.250 …`` when ``signed``)."""
        sign = "+" if signed else ""
        return (
            f"{self.mean:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, "
            f"{self.high:{sign}.{digits}f}]"
        )


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values [n]`` (n ≥ 1)."""
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    return Interval(float(values.mean()), *_percentiles(means, confidence), confidence)


def nested_bootstrap_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Interval of the mean over groups (seeds) of each group's mean over its values
    (questions): resample the groups with replacement, then the values inside each drawn
    group. With one group this is :func:`bootstrap_ci`."""
    _check_confidence(confidence)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("nested_bootstrap_ci needs one or more non-empty 1-D groups")
    rng = np.random.default_rng(seed)
    # Each group's resampled means, then groups drawn with replacement.
    inner = np.stack(
        [a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1) for a in arrays],
        axis=1,
    )  # [resamples, groups]
    picks = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
    means = np.take_along_axis(inner, picks, axis=1).mean(axis=1)
    point = float(np.mean([a.mean() for a in arrays]))
    return Interval(point, *_percentiles(means, confidence), confidence)


def per_question(records: list[dict], key: str = "correct") -> dict[tuple[str, int], list[float]]:
    """Completion records (evaluate's) grouped by question ``(task, index)``: their ``key``
    values in sample order."""
    grouped: dict[tuple[str, int], list[float]] = {}
    for record in records:
        grouped.setdefault((record["task"], int(record["index"])), []).append(float(record[key]))
    return grouped


def question_scores(records: list[dict]) -> dict[str, dict[tuple[str, int], float]]:
    """Per question: ``accuracy`` (mean correct over its samples), ``pass`` (any correct)
    and ``format`` (mean of the full answer format)."""
    correct = per_question(records)
    formatted = per_question(records, "answer_format")
    return {
        "accuracy": {q: float(np.mean(v)) for q, v in correct.items()},
        "pass": {q: float(max(v)) for q, v in correct.items()},
        "format": {q: float(np.mean(v)) for q, v in formatted.items()},
    }


def paired_differences(
    after: dict[tuple[str, int], float], before: dict[tuple[str, int], float]
) -> np.ndarray:
    """``after[q] − before[q]`` over the questions both hold (sorted); an error if the two
    share no question."""
    shared = sorted(set(after) & set(before))
    if not shared:
        raise ValueError("the two evaluations share no question: nothing to pair")
    return np.array([after[q] - before[q] for q in shared])
