"""GRPO trainer end to end on tiny random models: artefacts, exact resume, learning, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motg_fast.tasks.rewards import safe_rewards
from motg_fast.testing import ToyTasks, letter_reward, tiny_config, tiny_qwen2, tiny_tokenizer
from motg_fast.training.checkpoint import CheckpointError, list_checkpoints
from motg_fast.training.distributed import make_accelerator
from motg_fast.training.trainer import Trainer

TIMING = ("rollout_time", "train_time", "generated_tokens_per_s")


def _config(tmp_path, **changes):
    settings = dict(k=2, selection="topk", weighting="dirichlet", likelihood="exact", steps=4)
    return tiny_config(tmp_path / "run", **{**settings, "save_every": 2, **changes})


def _trainer(config, seed=0):
    return Trainer(
        config,
        model=tiny_qwen2(seed=seed).train(),
        tokenizer=tiny_tokenizer(),
        task_set=ToyTasks(),
        reward_fn=letter_reward,
    )


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_run_writes_config_metrics_plots_and_checkpoint(tmp_path):
    config = _config(tmp_path, steps=2, beta=0.05, mu=2)
    records = _trainer(config).train()
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["k"] == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines == records
    for key in (
        "loss",
        "reward",
        "correct",
        "kl",
        "clip_fraction",
        "grad_norm",
        "completion_length",
        "thinking_length",
        "mixture_diversity",
        "topk_entropy",
        "entropy",
        "embed_norm",
        "rollout_time",
        "train_time",
    ):
        assert key in lines[0], key
    assert (run / "plots" / "reward.png").stat().st_size > 1000
    (ckpt,) = list_checkpoints(run)
    reloaded = type(tiny_qwen2()).from_pretrained(ckpt / "model")
    assert reloaded.config.vocab_size == tiny_qwen2().config.vocab_size


def test_resume_continues_exactly(tmp_path):
    full = _trainer(_config(tmp_path / "a")).train()
    interrupted_config = _config(tmp_path / "b")
    trainer = _trainer(interrupted_config)
    original = trainer.train_step

    def crash_after_two(step):
        if step == 2:
            raise KeyboardInterrupt
        return original(step)

    trainer.train_step = crash_after_two
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed = Trainer(
        interrupted_config.replace(resume=True),
        model=tiny_qwen2(seed=99).train(),
        tokenizer=tiny_tokenizer(),
        task_set=ToyTasks(),
        reward_fn=letter_reward,
    )
    assert resumed.start_step == 2
    records = resumed.train()
    assert _without_timing(records) == _without_timing(full)
    a = type(tiny_qwen2()).from_pretrained(list_checkpoints(tmp_path / "a" / "run")[-1] / "model")
    b = type(tiny_qwen2()).from_pretrained(list_checkpoints(tmp_path / "b" / "run")[-1] / "model")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    "mode",
    [
        dict(k=1, selection="sample", weighting="prob", likelihood="token"),
        dict(k=2, selection="topk", weighting="dirichlet", likelihood="exact"),
    ],
    ids=["discrete", "motg-dirichlet"],
)
def test_reward_rises_on_a_learnable_task(tmp_path, mode):
    config = _config(
        tmp_path,
        steps=14,
        save_every=0,
        lr=2e-2,
        group_size=6,
        prompts_per_step=2,
        grad_accum=1,
        warmup_ratio=0.0,
        **mode,
    )
    records = _trainer(config).train()
    first = sum(r["reward"] for r in records[:3]) / 3
    last = sum(r["reward"] for r in records[-3:]) / 3
    assert last > first + 0.25 and last > 2 * first, (first, last)


def test_reward_function_that_raises_never_kills_training(tmp_path):
    def broken(completions, items):
        raise RuntimeError("scorer exploded")

    rewards, correct, report = safe_rewards(broken, ["x", "y"], [None, None])
    assert rewards == [0.0, 0.0] and report.failures == 1
    config = _config(tmp_path, steps=1, save_every=0)
    trainer = Trainer(
        config,
        model=tiny_qwen2(),
        tokenizer=tiny_tokenizer(),
        task_set=ToyTasks(),
        reward_fn=broken,
    )
    records = trainer.train()
    assert records[0]["reward"] == 0.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(k=0), "k"),
        (dict(weighting="soft"), "weighting"),
        (dict(lr=-1.0), "lr"),
        (dict(tasks="no_such_task"), "no_such_task"),
    ],
)
def test_bad_config_fails_at_start(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _trainer(_config(tmp_path, **changes))


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:1", "CUDA_VISIBLE_DEVICES"),
        ("foo", "unknown device 'foo'"),
        ("cuda", "CUDA is not available"),
    ],
)
def test_training_device_is_honoured_or_refused(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=message):
        make_accelerator(device)
    assert make_accelerator("cpu").device.type == "cpu"


def test_without_progress_bar_every_log_every_th_step_prints_a_line(tmp_path, capsys):
    config = _config(
        tmp_path, steps=3, log_every=2, group_size=2, prompts_per_step=1, max_new_tokens=4
    )
    _trainer(config).train()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 2/3: reward ")
    assert "tokens/s" in lines[0]


def test_resume_from_missing_or_corrupt_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _trainer(_config(tmp_path, resume=True))
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _trainer(_config(tmp_path, resume=True))
    broken = tmp_path / "run" / "checkpoints" / "step-000002"
    (broken / "COMPLETE").write_text("2\n")
    (broken / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        _trainer(_config(tmp_path, resume=True))


def _weights(run_dir: Path):
    (ckpt,) = list_checkpoints(run_dir)
    return type(tiny_qwen2()).from_pretrained(ckpt / "model").state_dict()


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_process_accelerate_run_agrees_with_one_process(tmp_path):
    """2 processes × 1 prompt vs 1 process × 2 prompts: same global batch, same update.

    Tolerance: metrics 1e-4 absolute, weights 1e-4 absolute — the runs differ only in the
    order of floating-point sums (DDP's all-reduce vs local accumulation).
    """
    script = str(Path(__file__).parent / "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA it runs gloo on the CPU
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    two = subprocess.run(
        [*launch, "--num_processes", "2", script, str(tmp_path / "two"), "1", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "2", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    one_metrics, two_metrics = read(tmp_path / "one"), read(tmp_path / "two")
    assert len(one_metrics) == len(two_metrics) == 3
    for a, b in zip(one_metrics, two_metrics):
        for key in ("reward", "loss", "kl", "completion_length", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert any(r["grad_norm"] > 0 for r in one_metrics)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-4), name


def test_reasoning_gym_task_with_heldout_evaluation(tmp_path):
    """The default path: tasks and rewards from Reasoning Gym, periodic held-out evaluation."""
    config = _config(
        tmp_path,
        tasks="basic_arithmetic",
        task_options='{"*": {"difficulty": 0}}',
        dataset_size=40,
        heldout_fraction=0.1,
        steps=2,
        save_every=0,
        eval_every=2,
        eval_questions=2,
        eval_samples=2,
        eval_batch_size=2,
    )
    trainer = Trainer(config, model=tiny_qwen2().train(), tokenizer=tiny_tokenizer())
    records = trainer.train()
    assert "heldout_accuracy" not in records[0]
    assert 0.0 <= records[1]["heldout_accuracy"] <= 1.0
    assert all(r["reward_failures"] == 0 for r in records)
    assert trainer.model.training  # evaluation puts the policy back in training mode


def _arithmetic(tmp_path, **changes):
    values = dict(
        tasks="basic_arithmetic",
        task_options='{"*": {"difficulty": 0}}',
        dataset_size=40,
        heldout_fraction=0.1,
        steps=2,
        save_every=0,
        eval_questions=3,
        eval_samples=2,
        eval_batch_size=3,
        final_eval="before_after",
    )
    return _config(tmp_path, **{**values, **changes})


def test_before_after_evaluation_prints_the_gain_and_is_not_repeated_on_resume(
    tmp_path, capsys, monkeypatch
):
    config = _arithmetic(tmp_path, save_every=1)
    trainer = Trainer(config, model=tiny_qwen2().train(), tokenizer=tiny_tokenizer())
    trainer.train()
    run = tmp_path / "run"
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    summary = json.loads((run / "heldout.json").read_text())
    assert before["overall"]["completions"] == after["overall"]["completions"] == 6
    assert summary["gain"]["metrics"]["accuracy"]["after"] == after["overall"]["accuracy"]
    gain = summary["gain"]["metrics"]["accuracy"]["gain"]
    assert gain["low"] <= gain["mean"] <= gain["high"]
    printed = capsys.readouterr().out
    assert "held-out: 3 questions x 2 samples" in printed and "gain [95% CI]" in printed
    report = (run / "report.md").read_text()
    table = printed[printed.index("held-out:") :].split("\n\n")[0].strip()
    assert f"```\n{table}\n```" in report  # the printed table, as printed
    assert "![reward](plots/reward.png)" in report and "| group_size | `" in report
    assert "- `config.json`" in report and "- `checkpoints/step-000002/`" in report
    # Extending the run: the base model's evaluation is read back, the trained one redone.
    evaluations = []
    monkeypatch.setattr(
        Trainer, "heldout_result", lambda self: evaluations.append(1) or after, raising=True
    )
    resumed = Trainer(
        config.replace(steps=3, resume=True), model=tiny_qwen2().train(), tokenizer=tiny_tokenizer()
    )
    resumed.train()
    assert len(evaluations) == 1  # after only
    assert json.loads((run / "eval_before.json").read_text()) == before


def test_token_budget_stops_the_run_and_saves_its_last_step(tmp_path):
    config = _config(tmp_path, steps=10, save_every=0, token_budget=1)
    trainer = _trainer(config)
    records = trainer.train()
    assert len(records) == 1 and records[0]["generated_tokens"] == trainer.generated_tokens > 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000001"]
    resumed = _trainer(config.replace(resume=True))
    assert resumed.generated_tokens == trainer.generated_tokens
    assert resumed.train() == records  # nothing left to do


# --------------------------------------------------------------------------- signal guard
def test_flat_groups_and_format_only_are_measured_on_constructed_batches():
    from motg_fast.training.metrics import signal_statistics

    rewards = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.0, 2.5, 1.0, 1.0])
    format_only = torch.tensor([True, True, True, True, False, False, True, True])
    stats = signal_statistics(rewards, 2, format_only)
    assert stats == {"flat_groups": 0.75, "format_only": 0.75}
    assert signal_statistics(rewards, 4) == {"flat_groups": 0.0}


@pytest.mark.parametrize(
    "record, cause",
    [
        ({"format_only": 0.9, "correct": 0.0, "reward": 0.5}, "format reward"),
        ({"format_only": 0.0, "correct": 1.0, "reward": 3.0}, "too easy"),
        ({"format_only": 0.0, "correct": 0.0, "reward": 0.0}, "no completion earns any reward"),
        ({"format_only": 0.1, "correct": 0.2, "reward": 1.0}, "--group_size"),
    ],
)
def test_a_stalled_run_says_so_once_per_patience_with_the_likely_cause(record, cause):
    from motg_fast.training.metrics import StallGuard

    guard = StallGuard(patience=3)
    said = [guard.update({**record, "flat_groups": 1.0}) for _ in range(6)]
    assert said[:2] == [None, None] and said[3:5] == [None, None]
    assert said[2].startswith("warning: no learning signal for 3 steps: ") and cause in said[2]
    assert "6 steps" in said[5] and "\n" not in said[5]
    assert guard.update({**record, "flat_groups": 0.5}) is None and guard.streak == 0


def test_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(_config(tmp_path, steps=2, save_every=0, report_to="tensorboard")).train()
    accumulators = []
    for events in (tmp_path / "run").rglob("events.out.tfevents.*"):
        accumulators.append(EventAccumulator(str(events)))
        accumulators[-1].Reload()
    (accumulator,) = [a for a in accumulators if "reward" in a.Tags()["scalars"]]
    scalars = accumulator.Tags()["scalars"]
    for name in ("reward", "loss", "flat_groups", "grad_norm"):
        assert name in scalars, (name, scalars)
    assert [e.step for e in accumulator.Scalars("reward")] == [1, 2]


def test_overwrite_deletes_every_output_a_run_writes(tmp_path):
    from motg_fast.training import trainer as trainer_module
    from motg_fast.training.checkpoint import RUN_OUTPUTS
    from motg_fast.training.report import REPORT

    written = {trainer_module.EVAL_BEFORE, trainer_module.EVAL_AFTER}
    written |= {trainer_module.HELDOUT_SUMMARY, REPORT}
    assert written <= set(RUN_OUTPUTS)  # a stale baseline would be read back as this run's
