"""The three commands are thin modules on top of the library: each parses only the config
parts it uses, and its --help lists exactly those options, with examples first."""

import dataclasses

import pytest

from motg_fast import compare, evaluate, train
from motg_fast.config import PARTS, RunConfig, TrainingConfig
from motg_fast.evaluation.comparison import CompareOptions


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return {word.split("=")[0].rstrip(",") for word in text.split() if word.startswith("--")}


def _fields(*classes) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("command", [train, evaluate, compare], ids=lambda m: m.__name__)
def test_help_starts_with_examples_and_prints_no_markup(command, capsys):
    text = _help(command.main, capsys)
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    examples = [line for line in command.__doc__.splitlines() if "python -m" in line]
    assert examples and all(line.strip() in text for line in examples)  # none cut off
    assert text.index("examples:") < text.index("options:")


def test_train_offers_every_field(capsys):
    flags = _flags(_help(train.main, capsys))
    assert {f"--{name}" for name in _fields(*PARTS.values())} <= flags


def test_evaluate_offers_no_training_or_run_option(capsys):
    flags = _flags(_help(evaluate.main, capsys))
    assert not flags & {f"--{name}" for name in _fields(TrainingConfig, RunConfig)}
    parts = [PARTS[name] for name in evaluate.PARTS]
    assert {f"--{name}" for name in _fields(*parts)} <= flags and "--eval_output" in flags


def test_compare_offers_nothing_it_overrides(capsys):
    flags = _flags(_help(compare.main, capsys))
    run_part = _fields(RunConfig) - {"save_every"}  # set for every run (save_every: passed on)
    assert not flags & {f"--{name}" for name in run_part}
    assert {f"--{name}" for name in _fields(CompareOptions, TrainingConfig)} <= flags


def test_a_command_ignores_preset_values_of_parts_it_does_not_use(capsys):
    config = evaluate.parse_config(["--preset", "paper"], parts=evaluate.PARTS)
    assert config.k == 2 and config.tasks == "paper" and "training" not in config.parts
    with pytest.raises(AttributeError, match="no training part"):
        config.lr  # noqa: B018
