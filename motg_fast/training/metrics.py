"""Run metrics: JSON lines on disk, token-level mixture statistics, PNG plots of the curves."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..files import write_text_atomic
from ..kernels import renormalised_logprobs
from ..types import Phase, Trajectories
from .grpo import masked_mean

# Curves drawn at the end of a run, in this order, when present in the metrics.
PLOTTED = (
    "reward",
    "correct",
    "loss",
    "kl",
    "clip_fraction",
    "grad_norm",
    "completion_length",
    "thinking_length",
    "mixture_diversity",
    "topk_entropy",
    "entropy",
    "embed_norm",
    "heldout_accuracy",
    "flat_groups",
    "format_only",
)


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, lines after the resumed step are dropped.

    Crash-safe: a line is appended in one write, a resumed log is rewritten atomically
    (a temporary file renamed over it), and a torn last line (a kill mid-write) is dropped
    with one warning when the log is read.
    """

    def __init__(self, path: Path, *, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        """The records on disk (a torn last line is dropped with a warning)."""
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl` (none if it is missing; a torn last line is dropped
    with a warning, a torn earlier line is an error naming it)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not valid JSON: {err}") from None
            print(f"warning: dropping a torn last line of {path}", file=sys.stderr)
    return records


STALL_STEPS = 5  # steps in a row without any learning signal before the run says so


def signal_statistics(
    rewards: torch.Tensor, group_size: int, format_only: torch.Tensor | None = None
) -> dict[str, float]:
    """`flat_groups`: share of prompt groups whose G rewards are all equal (zero advantage,
    no gradient); `format_only` (when known): share of completions rewarded for their
    format alone, without a correct answer."""
    groups = rewards.float().view(-1, group_size)
    flat = (groups.max(-1).values - groups.min(-1).values) <= 1e-9
    stats = {"flat_groups": float(flat.float().mean())}
    if format_only is not None:
        stats["format_only"] = float(format_only.float().mean())
    return stats


class StallGuard:
    """Counts steps in a row where every group is flat; after `STALL_STEPS` of them returns
    one line naming the likely cause (then again every `STALL_STEPS` steps)."""

    def __init__(self, patience: int = STALL_STEPS) -> None:
        self.patience = patience
        self.streak = 0

    def update(self, record: dict) -> str | None:
        self.streak = self.streak + 1 if record.get("flat_groups", 0.0) >= 1.0 else 0
        if self.streak == 0 or self.streak % self.patience:
            return None
        return f"warning: no learning signal for {self.streak} steps: {stall_cause(record)}"


def stall_cause(record: dict) -> str:
    """The likely reason every group's rewards are equal, from one step's metrics."""
    if record.get("format_only", 0.0) >= 0.5:
        return (
            "most completions collect only the format reward, never a correct answer "
            "(the format terms are being gamed): raise --reward_correctness, lower "
            "--reward_think/--reward_format, or pick an easier task"
        )
    if record.get("correct", 0.0) >= 1.0:
        return "every completion is correct: the task is too easy to learn from"
    if record.get("reward", 0.0) == 0.0:
        return (
            "no completion earns any reward: the task is too hard or the answer format is "
            "never produced (try an easier task, more --max_new_tokens or few-shot prompts)"
        )
    return "each prompt's completions all earn the same reward: raise --group_size or --temperature"


def token_statistics(traj: Trajectories) -> dict[str, float]:
    """The paper's token-level statistics over thinking (mixture) positions.

    `mixture_diversity` 1 − Σ w², `topk_entropy` the entropy of the renormalised
    probabilities over the valid slots, `entropy` the full-distribution entropy (when the
    trajectories carry the rollout's `entropy [N,T]`).
    """
    thinking = (traj.phase == Phase.MIXTURE).float()
    weights = traj.weights.float()
    stats = {"mixture_diversity": masked_mean(1.0 - (weights**2).sum(-1), thinking)}
    log_pt = renormalised_logprobs(traj.logprobs.float(), traj.mask)
    pt = log_pt.exp()
    topk_entropy = -torch.where(pt > 0, pt * log_pt, torch.zeros_like(pt)).sum(-1)
    stats["topk_entropy"] = masked_mean(topk_entropy, thinking)
    if traj.entropy is not None:
        stats["entropy"] = masked_mean(traj.entropy.float(), thinking)
    return {name: float(value) for name, value in stats.items()}


def plot_metrics(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per plotted metric (curve over `step`); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PLOTTED:
        points = [
            (r["step"], r[name])
            for r in records
            if name in r and isinstance(r[name], (int, float)) and math.isfinite(r[name])
        ]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
