"""MoT-G GRPO with TRL on a Reasoning Gym task: a starting point for TRL users.

    python examples/trl_mixture_grpo.py                    # the default job's settings
    python examples/trl_mixture_grpo.py --max_steps 2 --num_generations 2 \\
        --per_device_train_batch_size 2 --max_completion_length 16     # a seconds-long smoke run
    accelerate launch examples/trl_mixture_grpo.py --model /path/to/Qwen2.5-1.5B-Instruct \\
        --tasks acre --bf16 true --num_generations 10 --max_completion_length 1024

It is a plain TRL GRPO script: a `datasets.Dataset` with a `prompt` column, a reward
function, a config and a trainer; only the two classes come from motg_fast. Every
`GRPOConfig` flag works (`--learning_rate`, `--beta`, `--loss_type`, `--report_to`, ...),
with the mixture flags of `MixtureGRPOConfig` (`--mixture_k`, `--mixture_selection`,
`--mixture_weighting`, `--mixture_likelihood`, ...) and this script's own (`--model`,
`--tasks`, `--task_options`, `--num_prompts`, `--dataset_size`).

Prompts are motg_fast's reasoning format (the chat template, then `<think>`); the reward is
motg_fast's: 2 x the task's score of the `<answer>` text plus format terms, with the
accuracy logged as `accuracy`. Every default is that of `python -m motg_fast.train` (the
config parts' defaults: prompt, reward, task, G, prompts per step, steps, learning rate, τ,
completion length, k).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import HfArgumentParser

from motg_fast.config import DecodingConfig, ModelConfig, TaskConfig, TrainingConfig
from motg_fast.integrations.trl import MixtureGRPOConfig, MixtureGRPOTrainer
from motg_fast.models import load_model, load_tokenizer
from motg_fast.tasks.base import TaskSet
from motg_fast.tasks.prompting import prompt_text
from motg_fast.tasks.rewards import RewardWeights, score_items
from motg_fast.tasks.spec import build_tasks

# The defaults of `python -m motg_fast.train`, read from its config parts.
TASK, DECODING, TRAINING = TaskConfig(), DecodingConfig(), TrainingConfig()


@dataclass
class ScriptArguments:
    """The model and the data; the training options are `MixtureGRPOConfig`'s."""

    model: str = field(default=ModelConfig().model, metadata={"help": "model name or path"})
    tasks: str = field(default=TASK.tasks, metadata={"help": "Reasoning Gym tasks"})
    task_options: str = field(
        default=TASK.task_options, metadata={"help": "JSON of per-task options"}
    )
    num_prompts: int = field(default=256, metadata={"help": "training questions drawn"})
    dataset_size: int = field(default=TASK.dataset_size, metadata={"help": "items per task"})
    system_prompt: str = field(default=TASK.system_prompt, metadata={"help": "system prompt"})


# The default job's settings (any flag overrides them): G trajectories of 4 prompts a step.
DEFAULTS = dict(
    output_dir="runs/trl_motg",
    max_steps=TRAINING.steps,
    per_device_train_batch_size=TRAINING.group_size * TRAINING.prompts_per_step,
    num_generations=TRAINING.group_size,
    max_completion_length=DECODING.max_new_tokens,
    learning_rate=TRAINING.lr,
    temperature=DECODING.temperature,
    mixture_k=DECODING.k,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=torch.cuda.is_available(),
    gradient_checkpointing=False,
)


def parse_args(argv: list[str] | None) -> tuple[ScriptArguments, MixtureGRPOConfig]:
    """The script's arguments and the trainer's config from the command line."""
    parser = HfArgumentParser((ScriptArguments, MixtureGRPOConfig))
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def build_dataset(task_set: TaskSet, tokenizer, script: ScriptArguments, seed: int) -> Dataset:
    """`num_prompts` training questions: `prompt` (text ending in `<think>`), `task`, `index`."""
    items = task_set.sample_train(script.num_prompts, random.Random(seed))
    return Dataset.from_dict(
        {
            "prompt": [prompt_text(tokenizer, it.question, script.system_prompt) for it in items],
            "task": [it.task for it in items],
            "index": [it.index for it in items],
        }
    )


def reasoning_gym_reward(task_set: TaskSet, weights: RewardWeights | None = None) -> Callable:
    """A TRL reward function scoring completions against their Reasoning Gym items (the
    default job's reward weights unless given)."""
    weights = weights or TASK.reward_weights()

    def reasoning_gym(completions, task, index, log_metric=None, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        items = [task_set.tasks[name].item(i) for name, i in zip(task, index, strict=True)]
        results = score_items(texts, items, weights)
        if log_metric is not None:
            log_metric("accuracy", sum(r.correct for r in results) / len(results))
        return [r.reward for r in results]

    return reasoning_gym


def main(argv: list[str] | None = None) -> MixtureGRPOTrainer:
    """Train and return the trainer (its `state.log_history` holds the metrics)."""
    script, args = parse_args(argv)
    tokenizer = load_tokenizer(script.model)
    tokenizer.padding_side = "left"
    model = load_model(script.model, dtype="float32", device="cpu")  # the Trainer places it
    task_set = build_tasks(
        script.tasks, script.task_options, size=script.dataset_size, seed=args.seed
    )
    trainer = MixtureGRPOTrainer(
        model=model,
        reward_funcs=reasoning_gym_reward(task_set),
        args=args,
        train_dataset=build_dataset(task_set, tokenizer, script, args.seed),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
