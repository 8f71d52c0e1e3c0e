"""Runs never lose data, and bad input is one clear line before any slow work.

Run directories (reuse, resume rules, damaged checkpoints, interrupted writes, torn metrics),
model lookup of run directories, evaluation output, reward-scorer failures, and the crash
test: a run killed at seeded points while saving or resuming ends, once resumed, with the
metrics and weights of an uninterrupted run.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from motg_fast import models
from motg_fast.cli import run_cli
from motg_fast.config import Config
from motg_fast.evaluate import main as evaluate_main
from motg_fast.kernels import MixtureSpec, action_logprob, mixture_logprobs
from motg_fast.tasks.base import TaskItem
from motg_fast.tasks.rewards import task_reward
from motg_fast.testing import ToyTasks, letter_reward, tiny_config, tiny_qwen2, tiny_tokenizer
from motg_fast.training.checkpoint import CheckpointError, list_checkpoints
from motg_fast.training.metrics import MetricsLog
from motg_fast.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("rollout_time", "train_time", "generated_tokens_per_s")


def _config(tmp_path, **changes):
    settings = dict(seed=1, k=2, weighting="dirichlet", group_size=2, prompts_per_step=1)
    settings.update(save_every=1, max_new_tokens=4)
    return tiny_config(tmp_path / "run", **{**settings, **changes})


def _trainer(config, **kw):
    kw.setdefault("reward_fn", letter_reward)
    return Trainer(
        config, model=tiny_qwen2().train(), tokenizer=tiny_tokenizer(), task_set=ToyTasks(), **kw
    )


# ------------------------------------------------------------------ 1. reusing a run directory
def test_a_new_run_refuses_a_used_run_dir_and_overwrite_starts_over(tmp_path):
    _trainer(_config(tmp_path)).train()
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds a run .* with --resume, .* with --overwrite"):
        _trainer(_config(tmp_path, steps=1))
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]
    _trainer(_config(tmp_path, steps=1, overwrite=True)).train()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]
    with pytest.raises(ValueError, match="contradict"):
        _config(tmp_path, resume=True, overwrite=True)


# ------------------------------------------------------------------ 2. --model RUN_DIR
def test_a_run_directory_loads_as_a_model(tmp_path):
    _trainer(_config(tmp_path)).train()
    run = tmp_path / "run"
    assert models.resolve_model_path(str(run)) == str(run / "checkpoints/step-000002/model")
    loaded = models.load_model(str(run), device="cpu")
    assert loaded.config.vocab_size == tiny_qwen2().config.vocab_size
    empty = tmp_path / "fresh"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(models.ModelLoadError, match="holds no complete checkpoint"):
        models.resolve_model_path(str(empty))
    with pytest.raises(models.ModelLoadError, match="--model is empty"):
        models.resolve_model_path("")


# ------------------------------------------------------------------ 3. evaluation output
def test_evaluate_checks_its_output_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = run_cli(
        evaluate_main, ["--model", "/no/such/model", "--eval_output", str(blocker / "eval.json")]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--eval_output" in err and "cannot be written" in err  # not the model's error


# ------------------------------------------------------------------ 4. resume rules
def test_resume_refuses_experiment_changes_and_allows_the_others(tmp_path):
    _trainer(_config(tmp_path)).train()
    run = tmp_path / "run"
    saved = (run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"changed experiment: k \(2 in the run\), model"):
        _trainer(_config(tmp_path, resume=True, steps=3, k=3, model="other"))
    assert (run / "config.json").read_text() == saved  # not overwritten by the refused run
    records = _trainer(_config(tmp_path, resume=True, steps=3, eval_every=0, log_every=5)).train()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["steps"] == 3


# ------------------------------------------------------------------ 5. damaged checkpoints
def _truncate_weights(checkpoint: Path) -> Path:
    (weights,) = (checkpoint / "model").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def test_a_damaged_newest_checkpoint_falls_back_in_one_line(tmp_path, capsys):
    _trainer(_config(tmp_path)).train()
    run = tmp_path / "run"
    _truncate_weights(run / "checkpoints" / "step-000002")
    trainer = _trainer(_config(tmp_path, resume=True, steps=3))
    warned = [x for x in capsys.readouterr().err.splitlines() if "damaged" in x]
    assert trainer.start_step == 1
    assert len(warned) == 1 and "skipping a damaged checkpoint" in warned[0]
    assert "step-000002" in warned[0]
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]  # the damaged one went
    bad = _truncate_weights(run / "checkpoints" / "step-000001")
    with pytest.raises(
        CheckpointError, match=f"cannot resume: {re.escape(str(bad))} is unreadable"
    ):
        _trainer(_config(tmp_path, resume=True, steps=3))


# ------------------------------------------------------------------ 6. interrupted writes
def test_an_interrupted_checkpoint_write_leaves_no_temporary_folder(tmp_path):
    _trainer(_config(tmp_path, steps=1)).train()
    stale = tmp_path / "run" / "checkpoints" / ".step-000002.abc"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "big.bin").write_bytes(b"0" * 1000)
    _trainer(_config(tmp_path, resume=True, steps=2)).train()
    assert not stale.exists()


# ------------------------------------------------------------------ 7. reward failures
def _raising(answer, entry):
    raise ValueError(f"cannot parse {answer!r}")


def test_a_raising_scorer_is_counted_and_reported(capsys):
    reward = task_reward(Config().reward_weights())
    done = "</think><answer>abc</answer>"
    item = TaskItem("prime_factorization", 0, {"question": "q"}, _raising)
    rewards, correct, report = reward([done, "no answer"], [item, item])
    assert report.failures == 1 and correct == [0.0, 0.0] and rewards[0] == 0.25  # format only
    assert report.format_only == [True, False]
    out = capsys.readouterr().out
    assert "1 answer(s) made a verifier raise" in out and "ValueError" in out


def test_reward_failures_survive_a_resume(tmp_path):
    def failing(completions, items):
        rewards, correct = letter_reward(completions, items)
        return rewards, correct, 1

    _trainer(_config(tmp_path), reward_fn=failing).train()
    records = _trainer(_config(tmp_path, resume=True, steps=3), reward_fn=failing).train()
    assert [r["reward_failures"] for r in records] == [1, 2, 3]


# ------------------------------------------------------------------ 8. torn metrics lines
def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss"')
    log = MetricsLog(path, resume_step=2)
    assert log.read() == [{"step": 1}, {"step": 2}]
    assert "dropping a torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path} line 2 is not valid JSON"):
        MetricsLog(path, resume_step=3)


# ------------------------------------------------------------------ 9. bad run directories
def test_a_bad_run_dir_fails_before_loading_anything(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for run_dir, message in [(blocker, "is a file"), (blocker / "sub", "is not writable")]:
        config = _config(tmp_path, model="/no/such/model", run_dir=str(run_dir))
        with pytest.raises(ValueError, match=message):  # not the model's error
            Trainer(config, task_set=ToyTasks(), reward_fn=letter_reward)


# ------------------------------------------------------------------ 11. quieter, clearer
def test_group_size_one_is_refused():
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        Config(group_size=1)


def test_cli_runs_silence_transformers_progress_bars():
    from transformers.utils import logging

    logging.enable_progress_bar()
    assert run_cli(lambda argv: None, []) == 0
    assert not logging.is_progress_bar_enabled()
    logging.enable_progress_bar()


def test_rollouts_raise_no_cache_deprecation_warning():
    from motg_fast.rollout.engine import RolloutEngine

    tokenizer = tiny_tokenizer()
    engine = RolloutEngine(tiny_qwen2(), tokenizer, max_new_tokens=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate([tokenizer.encode("a <think>")], MixtureSpec(k=2), group_size=2)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_an_uncached_hub_id_fails_at_once_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    calls = []

    class Loader:
        @staticmethod
        def from_pretrained(target, local_files_only=False, **kwargs):
            calls.append(local_files_only)
            raise OSError("not in the cache")

    with pytest.raises(models.ModelLoadError, match="not a local directory"):
        models._from_pretrained(Loader, "someone/not-cached", "someone/not-cached")
    assert calls == [True]  # the download (and its retries) never started


@pytest.mark.subprocess
def test_plain_pytest_collects_every_module():
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run(
        [str(pytest_bin), "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_reference_logprobs_name_a_dtype_mismatch():
    hidden, weight = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(10, 4)
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="must share one dtype"):
        mixture_logprobs(hidden, weight, ids, backend="reference")


def test_a_token_in_a_masked_slot_is_an_error():
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="masked slot"):
        action_logprob(
            torch.log(torch.tensor([[0.6, 0.3]])),
            mask,
            torch.tensor([1]),
            MixtureSpec(k=2, selection="sample"),
            likelihood="exact",
            rest_logprob=torch.log(torch.tensor([0.1])),
        )


# ------------------------------------------------------------------ crash safety
CRASH_ARGS = [
    "--tasks", "leg_counting", "--dataset_size", "40", "--heldout_fraction", "0.1",
    "--seed", "5", "--k", "2", "--weighting", "dirichlet", "--group_size", "2",
    "--prompts_per_step", "1", "--steps", "3", "--save_every", "1", "--max_new_tokens", "4",
    "--system_prompt", "Think.", "--final_eval", "none", "--no_progress",
]  # fmt: skip


def _crash_run(model_dir, run_dir, target="none", kill_at=0, *extra):
    args = [sys.executable, str(ROOT / "tests" / "crash_train.py"), target, str(kill_at)]
    args += ["--model", str(model_dir), "--run_dir", str(run_dir), *CRASH_ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _outcome(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]
    final = list_checkpoints(run_dir)[-1] / "model"
    return records, load_file(str(next(final.glob("*.safetensors"))))


@pytest.mark.subprocess
@pytest.mark.slow
def test_runs_killed_while_saving_or_resuming_end_like_an_uninterrupted_run(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_qwen2(max_position_embeddings=1024).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    clean = _crash_run(model_dir, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    calls = json.loads(clean.stdout.split("calls:")[-1])
    want_records, want_weights = _outcome(tmp_path / "clean")
    # Seeded kill points after the first checkpoint is committed (before it, there is nothing
    # to resume): each target's n-th call from `first` on, n drawn from a fixed seed.
    first = {"save_pretrained": 2, "torch.save": 2, "os.replace": 4, "metrics.append": 2}
    rng = random.Random(0)
    scenarios = [[(target, rng.randint(low, calls[target]))] for target, low in first.items()]
    scenarios.append([("torch.save", 2), ("os.replace", 1)])  # killed again while resuming
    for number, kills in enumerate(scenarios):
        run_dir = tmp_path / f"killed-{number}"
        for attempt, (target, kill_at) in enumerate(kills):
            resume = ["--resume"] if attempt else []
            killed = _crash_run(model_dir, run_dir, target, kill_at, *resume)
            assert killed.returncode == -signal.SIGKILL, (kills, killed.stderr[-2000:])
        done = _crash_run(model_dir, run_dir, "none", 0, "--resume")
        assert done.returncode == 0, (kills, done.stderr[-3000:])
        records, weights = _outcome(run_dir)
        assert records == want_records, kills
        assert weights.keys() == want_weights.keys()
        assert all(torch.equal(weights[k], want_weights[k]) for k in weights), kills
        assert not list((run_dir / "checkpoints").glob(".step-*")), kills


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_during_a_save_exits_with_a_message_and_no_leftovers(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_qwen2(max_position_embeddings=1024).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    driver = (
        "import os, signal, sys, torch\n"
        "import motg_fast.training.checkpoint as c\n"
        "save = torch.save\n"
        "def term(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return save(*a, **k)\n"
        "c.torch.save = term\n"
        "from motg_fast.cli import run_cli\n"
        "from motg_fast.train import main\n"
        "sys.exit(run_cli(main, sys.argv[1:]))\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", driver, "--model", str(model_dir), "--run_dir", str(run_dir)]
        + CRASH_ARGS,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last == f"interrupted: continue from the last checkpoint with --run_dir {run_dir} --resume"
    )
    assert not list((run_dir / "checkpoints").glob(".step-*"))
