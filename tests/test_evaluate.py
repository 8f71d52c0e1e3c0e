"""The config, its generated CLI, and `python -m motg_fast.evaluate` end to end on tiny models."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from motg_fast.cli import build_parser, parse_config, run_cli
from motg_fast.config import PARTS, Config, DecodingConfig
from motg_fast.evaluate import PARTS as EVALUATE_PARTS
from motg_fast.evaluate import main
from motg_fast.evaluation.heldout import evaluate, format_table, summarize
from motg_fast.kernels import MixtureSpec
from motg_fast.presets import PRESETS
from motg_fast.tasks.spec import build_tasks
from motg_fast.testing import tiny_qwen2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--tasks", "leg_counting,basic_arithmetic",
    "--dataset_size", "40",
    "--heldout_fraction", "0.1",
    "--eval_questions", "2",
    "--eval_samples", "3",
    "--eval_batch_size", "2",
    "--max_new_tokens", "6",
    "--system_prompt", "Think.",
    "--no-progress",
]  # fmt: skip


# --------------------------------------------------------------------------- config and CLI
ALL_FIELDS = [f for part in PARTS.values() for f in dataclasses.fields(part)]


def test_every_field_has_help_and_a_flag():
    parser = build_parser(list(PARTS.values()))
    flags = {a.dest for a in parser._actions}
    for field in ALL_FIELDS:
        assert field.metadata.get("help"), field.name
        assert field.name in flags


def test_help_lists_every_option_and_the_spec_fields_come_from_the_spec(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], prog="python -m motg_fast.train")
    shown = capsys.readouterr().out
    for field in ALL_FIELDS:
        assert f"--{field.name}" in shown, field.name
    for name in ("--preset", "--config", "--no_progress"):
        assert name in shown
    spec_fields = MixtureSpec.__dataclass_fields__
    for name, field in spec_fields.items():
        assert DecodingConfig.__dataclass_fields__[name].metadata == field.metadata, name


def test_a_run_launches_from_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "k: 3\nselection: sample\nweighting: dirichlet\nlr: 1e-5\nbetas: [0.8, 0.95]\n"
        "top_p: null\nprogress: false\n"
    )
    c = parse_config(["--config", str(path), "--preset", "smoke", "--k", "4"])
    assert (c.k, c.selection, c.weighting, c.lr, c.betas, c.progress) == (
        4,
        "sample",
        "dirichlet",
        1e-5,
        (0.8, 0.95),
        False,
    )
    assert c.max_new_tokens == PRESETS["smoke"]["max_new_tokens"]
    assert c.spec == MixtureSpec(k=4, temperature=0.9, selection="sample", weighting="dirichlet")
    path.write_text("k: 2\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown config field"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--k", "two"], "argument --k: invalid int value: 'two'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ],
)
def test_flag_errors_are_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and words in err


def test_defaults_and_every_preset_validate_and_round_trip_through_json():
    for values in [{}, *PRESETS.values()]:
        config = Config(**values)
        assert Config.from_dict(json.loads(config.to_json())) == config


def test_paper_preset_has_the_design_values():
    c = parse_config(["--preset", "paper"])
    assert (c.model, c.k, c.temperature, c.group_size, c.prompts_per_step) == (
        "Qwen/Qwen2.5-1.5B-Instruct",
        2,
        0.9,
        10,
        1,
    )
    assert (c.grad_accum, c.steps, c.lr, c.betas, c.weight_decay, c.grad_clip) == (
        4,
        1000,
        5e-6,
        (0.9, 0.99),
        0.1,
        0.1,
    )
    assert (c.warmup_ratio, c.beta, c.mu, c.max_prompt_tokens, c.max_new_tokens) == (
        0.18,
        0.1,
        1,
        1024,
        1024,
    )
    # bf16 compute: "auto" trains fp32 master weights under bf16 autocast on CUDA (pure bf16
    # weights would round away most AdamW updates at lr 5e-6) and evaluates in bf16
    assert (c.dtype, c.dataset_size, c.seed, c.heldout_fraction, c.tasks) == (
        "auto",
        10_000,
        42,
        0.01,
        "paper",
    )
    assert c.reward_correctness == 2.0
    assert parse_config(["--preset", "paper_g5"]).group_size == 5


def test_explicit_flags_override_the_preset_and_the_config_file(tmp_path):
    saved = Config(k=3, temperature=0.5).save(tmp_path)
    assert saved == tmp_path / "config.json"
    c = parse_config(
        [
            "--config",
            str(saved),
            "--preset",
            "smoke",
            "--k",
            "4",
            "--top_p",
            "0.9",
            "--min_p",
            "none",
            "--betas",
            "0.8",
            "0.95",
            "--no-progress",
        ]
    )
    assert (c.k, c.temperature, c.max_new_tokens, c.top_p, c.min_p) == (4, 0.5, 32, 0.9, None)
    assert c.betas == (0.8, 0.95) and c.progress is False
    assert Config.load(saved) == Config(k=3, temperature=0.5)
    assert Config.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"selection": "nucleus"}, "unknown selection 'nucleus'"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"tasks": "nope"}, "unknown task 'nope'"),
        ({"task_options": '{"basic_arithmetic": {"bogus": 1}}'}, "no option 'bogus'"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"k": 1, "selection": "topk"}, "greedy decoding"),
    ],
)
def test_validation_names_the_bad_field(changes, words):
    with pytest.raises(ValueError, match=words):
        Config(**changes)


def test_greedy_is_fine_for_evaluation_only():
    config = parse_config(["--k", "1", "--selection", "topk"], parts=EVALUATE_PARTS)
    assert config.spec.is_deterministic and "training" not in config.parts
    with pytest.raises(ValueError, match="greedy decoding"):
        Config(k=1, selection="topk")


def test_reward_weights_and_the_spec_come_from_the_config():
    c = Config(reward_correctness=1.0, reward_think=0.1, reward_partial_credit=False, k=3)
    w = c.reward_weights()
    assert (w.correctness, w.think, w.format, w.partial_credit) == (1.0, 0.1, 0.25, False)
    assert c.spec == MixtureSpec(k=3, temperature=0.9)


# --------------------------------------------------------------------------- metrics
def _record(task, index, correct, **extra):
    base = dict(
        task=task,
        index=index,
        correct=correct,
        score=float(correct),
        reward=0.0,
        length=10,
        closed_think=True,
        answer_format=False,
        stop="eos",
    )
    return {**base, **extra}


def test_summary_accuracy_is_per_completion_and_pass_at_k_per_question():
    records = [
        _record("a", 0, True), _record("a", 0, False),
        _record("a", 1, False), _record("a", 1, False, stop="length", closed_think=False),
    ]  # fmt: skip
    metrics = summarize(records, samples=2)
    assert metrics["questions"] == 2 and metrics["completions"] == 4
    assert metrics["accuracy"] == 0.25 and metrics["pass@2"] == 0.5
    assert metrics["closed_think"] == 0.75 and metrics["truncated"] == 0.25
    table = format_table({"tasks": {"a": metrics, "b": metrics}, "overall": metrics, "samples": 2})
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["task", "questions", "samples", "accuracy", "pass@2"]
    assert [line.split()[0] for line in lines[2:]] == ["a", "b", "overall"]
    assert lines[2].split()[3:5] == ["0.250", "0.500"]


# --------------------------------------------------------------------------- evaluate()
def test_evaluate_function_on_a_tiny_model():
    config = Config(
        tasks="leg_counting,basic_arithmetic",
        dataset_size=40,
        heldout_fraction=0.1,
        eval_samples=2,
        eval_batch_size=3,
        max_new_tokens=5,
        system_prompt="Think.",
        progress=False,
    )
    items = build_tasks(
        config.tasks, config.task_options, size=40, heldout_fraction=0.1, seed=config.seed
    ).heldout(2)
    model, tokenizer = tiny_qwen2(max_position_embeddings=1024), tiny_tokenizer()
    result = evaluate(model, tokenizer, config, items)
    assert list(result["tasks"]) == ["leg_counting", "basic_arithmetic"]
    assert result["overall"]["completions"] == 8 and result["overall"]["questions"] == 4
    assert {(c["task"], c["index"], c["sample"]) for c in result["completions"]} == {
        (item.task, item.index, s) for item in items for s in range(2)
    }
    assert all(1 <= c["length"] <= 5 for c in result["completions"])
    again = evaluate(model, tokenizer, config, items)
    assert [c["completion"] for c in again["completions"]] == [
        c["completion"] for c in result["completions"]
    ]


# --------------------------------------------------------------------------- the CLI
def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "motg_fast.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.subprocess
def test_cli_end_to_end_writes_the_json_and_prints_the_table(tiny_dir, tmp_path):
    out = tmp_path / "eval" / "result.json"
    proc = _run_module("--model", str(tiny_dir), "--k", "2", *TINY_ARGS, "--eval_output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"leg_counting", "basic_arithmetic"}
    assert result["overall"]["completions"] == 2 * 2 * 3
    assert result["config"]["k"] == 2 and result["config"]["model"] == str(tiny_dir)
    assert "pass@3" in result["overall"]
    table = proc.stdout.splitlines()
    assert table[0].split()[:5] == ["task", "questions", "samples", "accuracy", "pass@3"]
    assert {line.split()[0] for line in table[2:]} == {
        "leg_counting",
        "basic_arithmetic",
        "overall",
    }


@pytest.mark.subprocess
def test_cli_missing_model_is_one_line_without_traceback(tmp_path):
    proc = _run_module("--model", str(tmp_path / "missing"), *TINY_ARGS)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model path {str(tmp_path / 'missing')!r} does not exist"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "leg_counting,nope"], "error: unknown task 'nope'; valid tasks: "),
        (["--task_options", '{"leg_counting": {"max_legs": 2}}'], "has no option 'max_legs'"),
        (["--task_options", "{oops"], "not valid JSON"),
        (["--eval_samples", "0"], "eval_samples must be an integer >= 1"),
    ],
)
def test_cli_bad_input_is_one_line(args, words, capsys):
    code = run_cli(main, ["--model", "/no/such/model", *TINY_ARGS, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err


def test_a_config_json_saved_before_the_config_parts_still_loads():
    """A run's config.json of commit 4bc6b14 (flat Config, before the spec gained
    top_p_mass, gumbel_noise_min/max and blend_temperature)."""
    saved = json.loads((ROOT / "tests" / "data" / "config_before_parts.json").read_text())
    assert "eval_output" in saved  # a field that is gone (the evaluate command owns it now)
    config = Config.from_dict(saved)
    assert (
        config.to_dict().items() >= {k: v for k, v in saved.items() if k != "eval_output"}.items()
    )
    changed = ("eval_batch_size", "grad_accum", "gradient_checkpointing")  # defaults since
    assert config == Config().replace(**{name: saved[name] for name in changed})
