"""The run's `report.md`: one page that says what ran, what it gained and where the rest is.

Written by the trainer at the end of a run (main process), from what the run directory
already holds; :func:`report_text` is pure, so a report can be rebuilt from any finished run.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

REPORT = "report.md"

# Config fields shown in the summary, in this order (the whole config is config.json).
SUMMARY_FIELDS = (
    "model",
    "tasks",
    "method",
    "k",
    "temperature",
    "selection",
    "weighting",
    "likelihood",
    "group_size",
    "prompts_per_step",
    "steps",
    "lr",
    "max_new_tokens",
    "eval_questions",
    "eval_samples",
    "seed",
)


def source_commit(path: Path | None = None) -> str | None:
    """The git commit of the motg_fast source (with `+changes` when the tree is dirty), or
    None outside a git checkout."""
    root = Path(path or __file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_summary(device: str) -> str:
    """`"cpu: AMD EPYC …, 2 cores"` or `"cuda: NVIDIA H100 …"`: where the run ran."""
    import os

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores"


def report_text(
    config: dict[str, Any],
    records: list[dict],
    summary: dict[str, Any] | None,
    gain_table: str | None,
    files: list[str],
    *,
    machine: str,
    commit: str | None,
    date: str | None = None,
) -> str:
    """The markdown of a report.

    Args:
        config: the run's config as saved (`config.json`).
        records: the metrics lines (`metrics.jsonl`), one per step.
        summary: the held-out summary (`heldout.json`) or None without a final evaluation.
        gain_table: the printed before/after table (None without a baseline).
        files: the run directory's files to point at, relative to it (plots included).
        machine: where it ran (:func:`machine_summary`).
        commit: the source commit (:func:`source_commit`).
        date: ISO date (default: today).
    """
    date = date or datetime.date.today().isoformat()
    out = [
        f"# Run report: {Path(config.get('run_dir', '.')).name}",
        "",
        f"{date} · {machine} · motg_fast {commit or '(not a git checkout)'} · {len(records)} steps",
        "",
        "## Held-out evaluation",
        "",
        *_evaluation_lines(summary, gain_table),
    ]
    if records:
        last = records[-1]
        time_s = sum(r.get("rollout_time", 0.0) + r.get("train_time", 0.0) for r in records)
        out += [
            "",
            "## Training",
            "",
            f"Last step {last['step']}: reward {last.get('reward', float('nan')):.3f}, "
            f"rollout accuracy {last.get('correct', float('nan')):.3f}; "
            f"{int(last.get('generated_tokens', 0))} tokens generated"
            + (f"; {time_s / 60:.1f} min in rollouts and updates." if time_s else "."),
        ]
    plots = [name for name in files if name.startswith("plots/") and name.endswith(".png")]
    if plots:
        out += ["", "## Learning curves", ""]
        out += [f"![{Path(name).stem}]({name})" for name in plots]
    out += ["", "## Config", "", "| field | value |", "|---|---|"]
    out += [f"| {name} | `{config[name]}` |" for name in SUMMARY_FIELDS if name in config]
    out += ["", "The whole config: `config.json` (rerun with `--config config.json`).", ""]
    out += ["## Files", ""]
    out += [f"- `{name}`" for name in files if not name.startswith("plots/")]
    out += ["- `plots/`: one PNG per metric" if plots else "", ""]
    return "\n".join(line for line in out if line is not None)


def _evaluation_lines(summary: dict[str, Any] | None, gain_table: str | None) -> list[str]:
    if gain_table:
        note = "Gains are paired by question, with 95 % bootstrap intervals (`heldout.json`)."
        return ["```", gain_table, "```", "", note]
    if summary:
        return [f"After training: accuracy {summary['after']['accuracy']:.3f} (`eval_after.json`)."]
    return ["None (final_eval none)."]


def write_report(
    run_dir: Path, records: list[dict], summary: dict[str, Any] | None, *, device: str
) -> Path:
    """Write `report.md` into `run_dir` from its config, `records` and the held-out
    `summary` (`heldout.json`'s content, or None); returns its path."""
    from ..evaluation.heldout import format_gain_table
    from ..files import write_text_atomic

    run_dir = Path(run_dir)
    gain = summary.get("gain") if summary else None
    text = report_text(
        json.loads((run_dir / "config.json").read_text()),
        records,
        summary,
        format_gain_table(gain) if gain else None,
        run_files(run_dir),
        machine=machine_summary(device),
        commit=source_commit(),
    )
    return write_text_atomic(run_dir / REPORT, text)


def run_files(run_dir: Path) -> list[str]:
    """The run directory's files and checkpoint folders, relative to it, sorted."""
    names = []
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        parts = relative.parts
        if parts[0] == "checkpoints":
            if len(parts) == 2 and path.is_dir() and not parts[1].startswith("."):
                names.append(f"{relative}/")
            continue
        if path.is_file() and relative.name != REPORT:
            names.append(str(relative))
    return names
