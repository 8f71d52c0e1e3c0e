"""Seeded comparison of methods (the library of ``python -m motg_fast.compare``).

Every arm × seed is a normal training run in its own run directory
``<out>/runs/<arm>/seed<i>``, on the shared base configuration with the arm's values and seed
``seed + i``; runs go seed by seed, arm by arm. An arm is a method name (``--method``) or a
YAML/JSON file of config values (its file name names the arm). A finished run is skipped
when the comparison is run again, an interrupted one resumes from its last checkpoint (one
every ``save_every`` steps).

**Compute matching.** With ``budget="tokens"`` (default) every arm of a seed gets the number
of tokens the first arm's rollouts generated in ``steps`` steps (``token_budget``; an arm may
take up to twice ``steps`` to spend it); with ``budget="steps"`` all arms run ``steps`` steps.
The table reports each arm's generated tokens, steps and training wall time either way.

**The G/2 claim.** Each arm named in ``half_group`` also runs with G/2 trajectories per
prompt for the first arm's number of steps (the paper: MoT-G with G/2 matches discrete
decoding with G, the first arm), listed as ``<arm>_G<G/2>``.

**Statistics.** Every run ends with a held-out evaluation (``eval_questions`` questions per
task × ``eval_samples`` samples, the arm's own decoding). Per arm: accuracy and pass@G with
95 % nested-bootstrap intervals (seeds, then questions within a seed; ``stats``), and the
paired difference to the first arm (same seed, same questions). Outputs in ``out``:
``results.md``, ``results.json`` and ``curves.png`` (reward and accuracy of the rollouts
against generated tokens, mean over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..files import write_json_atomic
from ..kernels.spec import METHODS
from ..presets import method_values, read_config_file
from ..training.checkpoint import list_checkpoints

RUN_SUMMARY = "compare_run.json"  # written in a run directory when its run has finished
BUDGETS = ("tokens", "steps")
STEP_CAP = 2  # a token-matched arm may take up to this many times `steps` steps


@dataclass
class CompareOptions:
    """The comparison's own options (the runs' other settings are the shared config parts)."""

    arms: str = dataclasses.field(
        default="discrete,paper_dirichlet,paper_different_tokens",
        metadata={
            "help": "comma-separated arms, the first one the reference: method names "
            f"({', '.join(METHODS)}) or YAML/JSON files of config values"
        },
    )
    seeds: int = dataclasses.field(default=3, metadata={"help": "seeds per arm: seed, seed + 1, …"})
    budget: str = dataclasses.field(
        default="tokens",
        metadata={
            "help": "what the arms share: tokens (the first arm's generated tokens in --steps "
            "steps) or steps",
            "choices": BUDGETS,
        },
    )
    half_group: str = dataclasses.field(
        default="paper_dirichlet",
        metadata={
            "help": "arms also run with G/2 trajectories per prompt for the first arm's "
            "steps (comma-separated; empty: none)"
        },
    )
    out: str = dataclasses.field(
        default="runs/compare", metadata={"help": "directory of the runs and the results"}
    )
    save_every: int = dataclasses.field(
        default=4,
        metadata={
            "help": "checkpoint every N steps, so an interrupted run resumes (0: only "
            "at the end, an interrupted run restarts)"
        },
    )
    keep_checkpoints_after: bool = dataclasses.field(
        default=False,
        metadata={"help": "keep each finished run's checkpoints (default: deleted, ~1.6 GB each)"},
    )

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not one of {', '.join(BUDGETS)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")


@dataclass(frozen=True)
class Arm:
    """One arm: its name, config values on top of the base, and how its budget is set."""

    name: str
    values: dict[str, Any]
    half_group: bool = False  # runs G/2 for the first arm's steps


@dataclass(frozen=True)
class Run:
    """One arm × seed."""

    arm: Arm
    seed_index: int
    seed: int
    run_dir: Path


def parse_arms(spec: str) -> list[Arm]:
    """The arms of ``--arms``: method names or config files, names unique."""
    arms = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            raise ValueError(f"empty entry in --arms {spec!r}")
        if token in METHODS:
            arms.append(Arm(token, method_values(token)))
        elif Path(token).suffix in (".yaml", ".yml", ".json"):
            if not Path(token).is_file():
                raise ValueError(f"arm file {token!r} does not exist")
            arms.append(Arm(Path(token).stem, read_config_file(token)))
        else:
            raise ValueError(
                f"unknown arm {token!r}: a method ({', '.join(METHODS)}) or a .yaml/.json file"
            )
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must differ, got {', '.join(names)}")
    return arms


def half_group_arms(arms: list[Arm], spec: str, group_size: int) -> list[Arm]:
    """The G/2 arms of ``--half_group`` (each must be one of ``arms``)."""
    by_name = {arm.name: arm for arm in arms}
    extra = []
    for name in (t.strip() for t in spec.split(",") if t.strip()):
        if name not in by_name:
            raise ValueError(f"--half_group {name!r} is not one of the arms: {', '.join(by_name)}")
        if group_size // 2 < 2:
            raise ValueError(f"--half_group needs group_size >= 4 (G/2 >= 2), got {group_size}")
        values = {**by_name[name].values, "group_size": group_size // 2}
        extra.append(Arm(f"{name}_G{group_size // 2}", values, half_group=True))
    return extra


def plan_runs(base: Config, options: CompareOptions) -> list[Run]:
    """Every arm × seed, seed-major (the first arm of a seed first: it sets the budget)."""
    arms = parse_arms(options.arms)
    arms += half_group_arms(arms, options.half_group, base.group_size)
    root = Path(options.out) / "runs"
    return [
        Run(arm, i, base.seed + i, root / arm.name / f"seed{i}")
        for i in range(options.seeds)
        for arm in arms
    ]


def run_config(base: Config, options: CompareOptions, run: Run, reference: dict | None) -> Config:
    """The full config of one run (every part; the run part set here); ``reference`` is the
    first arm's summary of this seed."""
    values = {**base.to_dict(), **run.arm.values}
    values.update(
        seed=run.seed,
        run_dir=str(run.run_dir),
        final_eval="after",
        overwrite=False,
        save_every=options.save_every,
    )
    if reference is not None and run.arm.half_group:
        values.update(steps=reference["steps"], token_budget=0)
    elif reference is not None and options.budget == "tokens":
        values.update(steps=STEP_CAP * base.steps, token_budget=reference["generated_tokens"])
    values.setdefault("method", None)
    return Config.from_dict(values)


def read_summary(run_dir: Path) -> dict | None:
    """The summary of a finished run, or None."""
    path = run_dir / RUN_SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def execute(config: Config, keep_checkpoints: bool) -> dict:
    """Train one run (resuming it if it has a checkpoint) and summarise it."""
    from ..training.trainer import Trainer

    run_dir = Path(config.run_dir)
    resume = bool(list_checkpoints(run_dir)) if run_dir.exists() else False
    leftovers = run_dir.exists() and any(run_dir.iterdir())
    config = config.replace(resume=resume, overwrite=leftovers and not resume)
    start = time.perf_counter()
    trainer = Trainer(config)
    records = trainer.train()
    wall = time.perf_counter() - start
    after = json.loads((run_dir / "eval_after.json").read_text())
    summary = {
        "steps": len(records),
        "generated_tokens": trainer.generated_tokens,
        "train_time_s": sum(r["rollout_time"] + r["train_time"] for r in records),
        "wall_s_this_session": wall,
        "heldout": after["overall"],
        "token_budget": config.token_budget,
    }
    del trainer
    if not keep_checkpoints:
        for path in list_checkpoints(run_dir):
            shutil.rmtree(path, ignore_errors=True)
    write_json_atomic(run_dir / RUN_SUMMARY, summary)  # its presence means "finished"
    return summary


def run_all(base: Config, options: CompareOptions, runs: list[Run]) -> dict[Path, dict]:
    """Run (or skip, if finished) every run in order; returns their summaries by run dir."""
    summaries: dict[Path, dict] = {}
    first = {run.seed: run.run_dir for run in runs if run.arm.name == runs[0].arm.name}
    for number, run in enumerate(runs, 1):
        reference = summaries.get(first[run.seed])
        summary = read_summary(run.run_dir)
        status = "done" if summary is not None else "running"
        print(f"[{number}/{len(runs)}] {run.arm.name} seed {run.seed}: {status}", flush=True)
        if summary is None:
            config = run_config(base, options, run, reference)
            summary = execute(config, options.keep_checkpoints_after)
        summaries[run.run_dir] = summary
    return summaries


# --------------------------------------------------------------------------------------
# Statistics and outputs
# --------------------------------------------------------------------------------------


def _question_scores(run: Run) -> dict[str, dict]:
    from .stats import question_scores

    after = json.loads((run.run_dir / "eval_after.json").read_text())
    return question_scores(after["completions"])


def analyse(runs: list[Run], summaries: dict[Path, dict], samples: int) -> dict[str, Any]:
    """Per arm: accuracy and pass@G with nested-bootstrap intervals, paired differences to the
    first arm, tokens, steps and time (means over seeds)."""
    from .stats import nested_bootstrap_ci, paired_differences

    arms = list(dict.fromkeys(run.arm.name for run in runs))
    scores = {run.run_dir: _question_scores(run) for run in runs}
    by_arm = {name: [run for run in runs if run.arm.name == name] for name in arms}
    reference = {run.seed: run for run in by_arm[arms[0]]}
    table = {}
    for name, arm_runs in by_arm.items():
        row: dict[str, Any] = {"seeds": len(arm_runs)}
        for metric in ("accuracy", "pass"):
            groups = [list(scores[run.run_dir][metric].values()) for run in arm_runs]
            row[metric] = nested_bootstrap_ci(groups).to_dict()
            if name != arms[0]:
                diffs = [
                    paired_differences(
                        scores[run.run_dir][metric], scores[reference[run.seed].run_dir][metric]
                    )
                    for run in arm_runs
                    if run.seed in reference
                ]
                row[f"{metric}_diff"] = nested_bootstrap_ci(diffs).to_dict() if diffs else None
        for key in ("generated_tokens", "steps", "train_time_s"):
            row[key] = sum(summaries[run.run_dir][key] for run in arm_runs) / len(arm_runs)
        formats = [summaries[run.run_dir]["heldout"]["format"] for run in arm_runs]
        row["format"] = sum(formats) / len(formats)
        table[name] = row
    return {"reference": arms[0], "samples": samples, "arms": table}


def format_markdown(result: dict[str, Any]) -> str:
    """The results table in markdown."""
    from .stats import Interval

    g = result["samples"]
    head = (
        f"| arm | seeds | accuracy [95% CI] | Δ accuracy vs {result['reference']} | "
        f"pass@{g} [95% CI] | Δ pass@{g} | format | tokens | steps | train time (s) |"
    )
    lines = [head, "|" + "---|" * 10]

    def cell(row: dict, key: str, signed: bool = False) -> str:
        value = row.get(key)
        return Interval(**value).format(signed=signed) if value else "—"

    for name, row in result["arms"].items():
        lines.append(
            f"| {name} | {row['seeds']} | {cell(row, 'accuracy')} | "
            f"{cell(row, 'accuracy_diff', True)} | {cell(row, 'pass')} | "
            f"{cell(row, 'pass_diff', True)} | {row['format']:.3f} | "
            f"{row['generated_tokens']:.0f} | {row['steps']:.1f} | {row['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[Run], out: Path) -> Path:
    """Rollout reward and accuracy against generated tokens, per arm (mean over seeds at
    each step index, x the mean cumulative tokens), as ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.metrics import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(run.arm.name for run in runs):
        logs = [read_metrics(r.run_dir / "metrics.jsonl") for r in runs if r.arm.name == name]
        logs = [log for log in logs if log]
        if not logs:
            continue
        steps = min(len(log) for log in logs)
        for ax, key in zip(axes, ("reward", "correct")):
            x = [sum(log[i]["generated_tokens"] for log in logs) / len(logs) for i in range(steps)]
            y = [sum(log[i][key] for log in logs) / len(logs) for i in range(steps)]
            ax.plot(x, y, label=name)
    for ax, title in zip(axes, ("rollout reward", "rollout accuracy")):
        ax.set_xlabel("generated tokens")
        ax.set_title(f"{title} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_outputs(
    base: Config, options: CompareOptions, runs: list[Run], result: dict[str, Any], command: str
) -> Path:
    """``results.json``, ``results.md`` and ``curves.png`` in ``options.out``."""
    out = Path(options.out)
    budget = (
        f"arms matched on the generated tokens of {result['reference']} in {base.steps} steps"
        if options.budget == "tokens"
        else f"every arm {base.steps} steps"
    )
    payload = {"command": command, "budget": budget, **result}
    payload["config"] = {**base.to_dict(), **dataclasses.asdict(options)}
    write_json_atomic(out / "results.json", payload)
    plot_curves(runs, out / "curves.png")
    text = "\n".join(
        [
            f"Budget: {budget}; G/2 arms run the reference's steps.",
            "",
            format_markdown(result),
            "",
            "Intervals: 95 % nested bootstrap (seeds, then held-out questions); Δ is paired "
            f"with {result['reference']} on the same seed and questions.",
            "",
        ]
    )
    (out / "results.md").write_text(text)
    return out / "results.md"
