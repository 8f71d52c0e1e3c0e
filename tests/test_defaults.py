"""One set of defaults: the Python API, the command line and the TRL example agree (the
default job's, the ones that learn)."""

import inspect

from test_trl import load_example

from motg_fast.cli import parse_config
from motg_fast.config import Config, TaskConfig
from motg_fast.tasks import prompting
from motg_fast.tasks.rewards import RewardWeights, score_items


def test_the_reward_defaults_are_the_command_lines():
    assert RewardWeights() == TaskConfig().reward_weights() == parse_config([]).reward_weights()
    default = inspect.signature(score_items).parameters["weights"].default
    assert default == RewardWeights()


def test_the_prompt_functions_default_to_the_config_prompt():
    assert prompting.DEFAULT_SYSTEM_PROMPT == TaskConfig().system_prompt
    for function in (prompting.build_prompt, prompting.prompt_text, prompting.plain_prompt):
        default = inspect.signature(function).parameters["system_prompt"].default
        assert default == TaskConfig().system_prompt, function.__name__


def test_the_trl_example_runs_the_default_job():
    example = load_example()
    script, args = example.parse_args([])
    config = Config()
    assert (script.tasks, script.task_options, script.system_prompt) == (
        config.tasks,
        config.task_options,
        config.system_prompt,
    )
    assert (args.max_steps, args.num_generations, args.learning_rate) == (
        config.steps,
        config.group_size,
        config.lr,
    )
    assert args.per_device_train_batch_size == config.group_size * config.prompts_per_step
    assert (args.max_completion_length, args.temperature) == (
        config.max_new_tokens,
        config.temperature,
    )
    assert args.mixture_spec == config.spec
