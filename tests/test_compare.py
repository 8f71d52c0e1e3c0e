"""Statistics (bootstrap intervals, paired gains) and `python -m motg_fast.compare` end to end."""

import json

import numpy as np
import pytest

from motg_fast import compare
from motg_fast.cli import parse_config
from motg_fast.evaluation import comparison
from motg_fast.evaluation.heldout import format_gain_table, heldout_gain
from motg_fast.evaluation.stats import (
    Interval,
    bootstrap_ci,
    nested_bootstrap_ci,
    paired_differences,
    question_scores,
)


# --------------------------------------------------------------------------- statistics
def test_bootstrap_interval_covers_a_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for trial in range(trials):
        values = rng.binomial(4, 0.3, size=64) / 4  # per-question accuracy of 4 samples
        interval = bootstrap_ci(values, resamples=1000, seed=trial)
        covered += interval.low <= 0.3 <= interval.high
    assert 0.90 <= covered / trials <= 0.98


def _coverage(between: float, trials: int = 200) -> float:
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(trials):
        groups = [rng.normal(0.5 + rng.normal(0, between), 0.3, size=40) for _ in range(6)]
        interval = nested_bootstrap_ci(groups, resamples=1000, seed=trial)
        covered += interval.low <= 0.5 <= interval.high
    return covered / trials


def test_nested_interval_covers_a_known_mean_and_widens_with_seed_variation():
    assert 0.85 <= _coverage(between=0.1) <= 1.0  # seeds differ: close to nominal
    assert _coverage(between=0.0) >= 0.93  # seeds agree: conservative (documented)
    rng = np.random.default_rng(3)
    same = [0.5 + rng.normal(0, 0.1, 40) for _ in range(3)]
    shifted = [g + offset for g, offset in zip(same, (-0.3, 0.0, 0.3))]
    narrow, wide = nested_bootstrap_ci(same), nested_bootstrap_ci(shifted)
    assert wide.high - wide.low > 3 * (narrow.high - narrow.low)


def test_intervals_refuse_empty_input_and_format_signed():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-empty"):
        nested_bootstrap_ci([[1.0], []])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)
    interval = Interval(0.125, 0.05, 0.2)
    assert interval.format(signed=True) == "+0.125 [+0.050, +0.200]"
    assert interval.excludes_zero() and not Interval(0.1, -0.1, 0.3).excludes_zero()


def _records(correct: dict[int, list[bool]], formatted: bool = True) -> list[dict]:
    return [
        {"task": "t", "index": q, "correct": c, "answer_format": formatted}
        for q, samples in correct.items()
        for c in samples
    ]


def test_question_scores_and_paired_gain_table():
    before = _records({0: [False, False], 1: [True, False], 2: [False, False]}, formatted=False)
    after = _records({0: [True, True], 1: [True, False], 2: [False, True]})
    scores = question_scores(after)
    assert scores["accuracy"] == {("t", 0): 1.0, ("t", 1): 0.5, ("t", 2): 0.5}
    assert scores["pass"] == {("t", 0): 1.0, ("t", 1): 1.0, ("t", 2): 1.0}
    diff = paired_differences(scores["accuracy"], question_scores(before)["accuracy"])
    assert diff.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="share no question"):
        paired_differences({("t", 9): 1.0}, scores["accuracy"])
    gain = heldout_gain({"completions": before, "samples": 2}, {"completions": after, "samples": 2})
    accuracy = gain["metrics"]["accuracy"]
    assert accuracy["before"] == pytest.approx(1 / 6) and accuracy["after"] == pytest.approx(2 / 3)
    assert accuracy["gain"]["mean"] == pytest.approx(0.5)
    assert gain["metrics"]["format"]["gain"]["mean"] == 1.0
    table = format_gain_table(gain)
    assert "3 questions x 2 samples" in table and "pass@2" in table and "+0.500 [" in table


# --------------------------------------------------------------------------- compare


def _argv(tiny_dir, out, *extra):
    return [
        "--model", str(tiny_dir), "--tasks", "leg_counting", "--out", str(out),
        "--arms", "discrete,paper_dirichlet", "--half_group", "paper_dirichlet",
        "--seeds", "2", "--steps", "2", "--group_size", "4", "--prompts_per_step", "1",
        "--max_new_tokens", "6", "--max_prompt_tokens", "96", "--system_prompt", "Think.",
        "--eval_questions", "3", "--eval_samples", "2", "--no_progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_compare_end_to_end_matches_budgets_reports_and_resumes(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    calls = []
    original = comparison.execute

    def interrupted_after_three(config, keep):
        calls.append(config.run_dir)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(config, keep)

    monkeypatch.setattr(comparison, "execute", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        compare.main(_argv(tiny_dir, out))
    monkeypatch.setattr(
        comparison,
        "execute",
        lambda config, keep: calls.append(config.run_dir) or original(config, keep),
    )
    result = compare.main(_argv(tiny_dir, out))
    # The three finished runs were not run again; the interrupted fourth and the rest were.
    assert len(calls) == 4 + 3 and calls[3] == calls[4]
    runs = {
        r.run_dir: r
        for r in comparison.plan_runs(
            *parse_config(
                _argv(tiny_dir, out), parts=compare.PARTS, extras=(comparison.CompareOptions,)
            )
        )
    }
    summaries = {d: comparison.read_summary(d) for d in runs}
    for seed in (0, 1):
        ref = summaries[out / "runs" / "discrete" / f"seed{seed}"]
        mix = summaries[out / "runs" / "paper_dirichlet" / f"seed{seed}"]
        half = summaries[out / "runs" / "paper_dirichlet_G2" / f"seed{seed}"]
        assert ref["steps"] == 2 and ref["token_budget"] == 0
        assert mix["token_budget"] == ref["generated_tokens"]
        assert mix["generated_tokens"] >= ref["generated_tokens"] or mix["steps"] == 4
        assert half["steps"] == 2 and half["token_budget"] == 0
        config = json.loads(
            (out / "runs" / "paper_dirichlet_G2" / f"seed{seed}" / "config.json").read_text()
        )
        assert config["group_size"] == 2 and config["seed"] == 42 + seed
        assert not list((out / "runs" / "discrete" / f"seed{seed}" / "checkpoints").glob("step-*"))
    # The statistics are those of the evaluation files.
    row = result["arms"]["paper_dirichlet"]
    per_seed = []
    for seed in (0, 1):
        after = json.loads(
            (out / "runs" / "paper_dirichlet" / f"seed{seed}" / "eval_after.json").read_text()
        )
        per_seed.append(np.mean(list(question_scores(after["completions"])["accuracy"].values())))
    assert row["accuracy"]["mean"] == pytest.approx(np.mean(per_seed))
    assert row["accuracy"]["low"] <= row["accuracy"]["mean"] <= row["accuracy"]["high"]
    assert result["arms"]["discrete"].get("accuracy_diff") is None
    assert "accuracy_diff" in row
    text = (out / "results.md").read_text()
    assert "paper_dirichlet_G2" in text and "Δ accuracy vs discrete" in text
    assert (out / "curves.png").stat().st_size > 1000
    for run_dir in runs:  # reading the logs for the plot left them whole
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    assert json.loads((out / "results.json").read_text())["arms"].keys() == result["arms"].keys()


def test_compare_refuses_bad_arms_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        comparison.parse_arms("discrete,nope")
    with pytest.raises(ValueError, match="arm names must differ"):
        comparison.parse_arms("discrete,discrete")
    with pytest.raises(ValueError, match="not one of the arms"):
        comparison.half_group_arms(comparison.parse_arms("discrete"), "multiplex", 8)
    with pytest.raises(ValueError, match="group_size >= 4"):
        comparison.half_group_arms(comparison.parse_arms("multiplex"), "multiplex", 2)
    arm_file = tmp_path / "cold.yaml"
    arm_file.write_text("k: 3\ntemperature: 0.7\n")
    arms = comparison.parse_arms(f"discrete,{arm_file}")
    assert arms[1].name == "cold" and arms[1].values == {"k": 3, "temperature": 0.7}
    with pytest.raises(ValueError, match="lr must be > 0"):
        compare.main(["--arms", "multiplex", "--lr", "-1", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="k must"):  # an arm file's bad value
        arm_file.write_text("k: 0\n")
        compare.main(
            ["--arms", f"discrete,{arm_file}", "--half_group", "", "--out", str(tmp_path / "o")]
        )
    assert not (tmp_path / "o").exists()
