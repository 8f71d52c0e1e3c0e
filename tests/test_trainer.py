"""GRPO trainer end to end on tiny random models: artefacts, exact resume, learning, errors."""

import dataclasses
import json
import random

import pytest
import torch

from motg_fast.checkpoint import CheckpointError, list_checkpoints
from motg_fast.config import Config
from motg_fast.trainer import Trainer, safe_rewards
from tiny_models import tiny_qwen2, tiny_tokenizer

TIMING = ("rollout_time", "train_time", "generated_tokens_per_s")


@dataclasses.dataclass(frozen=True)
class ToyItem:
    task: str
    question: str


class ToyTasks:
    """A trivially learnable task: the reward counts the letter "a" in the completion."""

    names = ["letters"]

    def sample_train(self, n, rng: random.Random):
        return [ToyItem("letters", f"say a {rng.randrange(10)}") for _ in range(n)]

    def heldout(self, per_task=None):
        return [ToyItem("letters", "say a")]


def letter_reward(completions, items):
    rewards = [text.count("a") / 8 for text in completions]
    return rewards, [float(r > 0.5) for r in rewards]


def _config(tmp_path, **changes):
    base = dict(
        model="unused-in-tests", tasks="leg_counting", run_dir=str(tmp_path / "run"), seed=3,
        k=2, selection="topk", weighting="dirichlet", likelihood="exact", temperature=1.0,
        group_size=4, prompts_per_step=2, grad_accum=2, steps=4, lr=3e-3, max_new_tokens=8,
        max_prompt_tokens=64, save_every=2, progress=False, warmup_ratio=0.25, grad_clip=1.0,
        system_prompt="Answer.",
    )
    base.update(changes)
    return Config(**base)


def _trainer(config, seed=0):
    return Trainer(config, model=tiny_qwen2(seed=seed).train(), tokenizer=tiny_tokenizer(),
                   task_set=ToyTasks(), reward_fn=letter_reward)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_run_writes_config_metrics_plots_and_checkpoint(tmp_path):
    config = _config(tmp_path, steps=2, beta=0.05, mu=2)
    records = _trainer(config).train()
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["k"] == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines == records
    for key in ("loss", "reward", "correct", "kl", "clip_fraction", "grad_norm",
                "completion_length", "thinking_length", "mixture_diversity", "topk_entropy",
                "entropy", "embed_norm", "rollout_time", "train_time"):
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
        dataclasses.replace(interrupted_config, resume=True), model=tiny_qwen2(seed=99).train(),
        tokenizer=tiny_tokenizer(), task_set=ToyTasks(), reward_fn=letter_reward,
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
    config = _config(tmp_path, steps=24, save_every=0, lr=2e-2, group_size=6, prompts_per_step=2,
                     grad_accum=1, warmup_ratio=0.0, **mode)
    records = _trainer(config).train()
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first + 0.25 and last > 2 * first, (first, last)


def test_reward_function_that_raises_never_kills_training(tmp_path):
    def broken(completions, items):
        raise RuntimeError("scorer exploded")

    rewards, correct, failures = safe_rewards(broken, ["x", "y"], [None, None])
    assert rewards == [0.0, 0.0] and failures == 1
    config = _config(tmp_path, steps=1, save_every=0)
    trainer = Trainer(config, model=tiny_qwen2(), tokenizer=tiny_tokenizer(), task_set=ToyTasks(),
                      reward_fn=broken)
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
