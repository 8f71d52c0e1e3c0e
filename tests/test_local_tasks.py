"""Your own data as tasks: every file format, the column options, the split rule, mixing
with Reasoning Gym, each verifier, the bad inputs (one line each, before any model), and a
smoke train and evaluate on the shipped example file."""

import json
import random
import re
from pathlib import Path

import pytest

from motg_fast.config import Config
from motg_fast.tasks.local import LocalTask
from motg_fast.tasks.spec import build_tasks
from motg_fast.tasks.verifiers import exact_match, math_equivalent, resolve_verifier

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data" / "word_problems.jsonl"
ROWS = [{"question": f"What is {n} + 1?", "answer": str(n + 1), "level": n % 3} for n in range(20)]


def _write(path: Path, rows=ROWS) -> Path:
    """``rows`` in the format of ``path``'s suffix."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _text(path: Path) -> Path:
    path.write_text("question,answer\n")
    return path


def _task(path, seed=0, fraction=0.2, **options) -> LocalTask:
    return LocalTask(str(path), options, seed=seed, heldout_fraction=fraction)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_loads_the_same_rows(tmp_path, suffix):
    task = _task(_write(tmp_path / f"data{suffix}"))
    rows = task.train_entries + task.heldout_entries
    assert sorted(r["question"] for r in rows) == sorted(r["question"] for r in ROWS)
    item = task.heldout(1)[0]
    assert item.scorer(item.answer, item.entry) == 1.0 and item.scorer("nope", item.entry) == 0.0


def test_a_saved_dataset_folder_uses_its_test_split_as_held_out(tmp_path):
    import datasets

    parts = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:15]), test=datasets.Dataset.from_list(ROWS[15:])
    )
    parts.save_to_disk(str(tmp_path / "saved"))
    task = _task(tmp_path / "saved")
    assert [e["question"] for e in task.heldout_entries] == [r["question"] for r in ROWS[15:]]
    assert len(task.train_entries) == 15


def test_a_split_column_marks_the_held_out_rows(tmp_path):
    rows = [{**r, "split": "test" if i < 4 else "train"} for i, r in enumerate(ROWS)]
    task = _task(_write(tmp_path / "d.jsonl", rows))
    assert [e["question"] for e in task.heldout_entries] == [r["question"] for r in ROWS[:4]]
    other = _task(_write(tmp_path / "e.jsonl", rows), split="train")
    assert len(other.heldout_entries) == 16
    with pytest.raises(ValueError, match="no part or 'split' value 'dev'"):
        _task(_write(tmp_path / "f.jsonl", rows), split="dev")


def test_the_split_is_reproducible_and_never_shares_a_question(tmp_path):
    rows = ROWS + [dict(ROWS[0], answer="1")] * 5  # a question repeated
    path = _write(tmp_path / "d.jsonl", rows)
    first, again = _task(path, seed=1), _task(path, seed=1)
    assert first.heldout_entries == again.heldout_entries
    assert len(first.heldout_entries) == 5  # ceil(0.2 * 25)
    held = {e["question"] for e in first.heldout_entries}
    assert not held & {e["question"] for e in first.train_entries}
    other = _task(path, seed=2)
    assert other.heldout_entries != first.heldout_entries
    rng = random.Random(0)
    assert all(first.sample_train(rng).question not in held for _ in range(50))


def test_columns_default_to_common_names_and_can_be_set(tmp_path):
    rows = [{"problem": r["question"], "solution": r["answer"]} for r in ROWS]
    task = _task(_write(tmp_path / "d.jsonl", rows))
    assert task.heldout(1)[0].question.startswith("What is")
    rows = [{"q": r["question"], "a": r["answer"]} for r in ROWS]
    path = _write(tmp_path / "e.jsonl", rows)
    with pytest.raises(ValueError, match="none of the columns \\['q', 'a'\\]"):
        _task(path)
    task = _task(path, question="q", answer="a")
    assert task.heldout(1)[0].answer in {r["a"] for r in rows}


def test_mixing_with_a_reasoning_gym_task(tmp_path):
    path = _write(tmp_path / "d.jsonl")
    options = {"*": {"difficulty": 0}, str(path): {"verifier": "math"}}
    spec = f"basic_arithmetic:1,{path}:3"
    tasks = build_tasks(spec, json.dumps(options), size=50, seed=0, heldout_fraction=0.1)
    assert tasks.names == ["basic_arithmetic", str(path)] and tasks.weights[str(path)] == 3.0
    drawn = [item.task for item in tasks.sample_train(400, random.Random(0))]
    assert 0.65 < drawn.count(str(path)) / 400 < 0.85
    heldout = tasks.heldout(2)
    assert [item.task for item in heldout] == ["basic_arithmetic"] * 2 + [str(path)] * 2
    for item in heldout:  # each scored by its own verifier
        assert item.scorer(item.answer, item.entry) == 1.0


def test_a_reasoning_gym_name_stays_a_task_beside_a_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "basic_arithmetic").write_text("not data")
    tasks = build_tasks("basic_arithmetic", '{"*": {"difficulty": 0}}', size=20, seed=0)
    assert type(tasks.tasks["basic_arithmetic"]).__name__ == "ReasoningGymTask"


def test_exact_match_normalises():
    got = exact_match([" 1,000. ", "PARIS", "3.0", "x", None], ["1000", "paris", "3", "y", "1"])
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_verify_accepts_equivalent_forms():
    forms = [r"\frac{1}{2}", "0.5", r"\boxed{1/2}", "1/2", r"$\frac12$", "the answer is 1/2"]
    assert math_equivalent(forms, [r"\frac{1}{2}"] * len(forms)) == [1.0] * len(forms)
    assert math_equivalent(["x+1", "2x", "0.25", None], ["1+x", "x*2", "1/2", "1"]) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]


def test_a_module_function_verifier_gets_every_column(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "seen = []\n"
        "def by_level(completions, answer, level, prompts, **kw):\n"
        "    seen.append((list(level), list(prompts)))\n"
        "    return [float(c == a) * (1.0 if l < 2 else 0.5)\n"
        "            for c, a, l in zip(completions, answer, level)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = _task(_write(tmp_path / "d.jsonl"), verifier="my_checks:by_level")
    scores = {e["level"]: task.score_answer(e["answer"], e) for e in task.train_entries}
    assert scores == {0: 1.0, 1: 1.0, 2: 0.5}
    import my_checks

    level, prompts = my_checks.seen[-1]
    assert prompts[0].startswith("What is") and level[0] in (0, 1, 2)
    assert resolve_verifier("motg_fast.tasks.verifiers:exact_match") is exact_match


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("make", "options", "words"),
    [
        (lambda d: d / "missing.jsonl", {}, "task file .*missing.jsonl not found"),
        (lambda d: _write(d / "d.jsonl"), {"answer": "nope"}, "has no column 'nope'"),
        (lambda d: _write(d / "d.jsonl", []), {}, "cannot be read|has no rows"),
        (
            lambda d: _write(d / "d.jsonl", ROWS[:3] + [{"question": "q?", "answer": ""}]),
            {},
            "row 3 has no answer in column 'answer'",
        ),
        (lambda d: _write(d / "d.jsonl"), {"verifier": "no_such_mod:f"}, "cannot be imported"),
        (lambda d: _write(d / "d.jsonl"), {"verifier": "json:nothing"}, "has no function"),
        (lambda d: _write(d / "d.jsonl"), {"verifier": "json:loads"}, "raised on its first"),
        (lambda d: _write(d / "d.jsonl"), {"colour": "x"}, "unknown option\\(s\\) colour"),
        (lambda d: _text(d / "d.txt"), {}, "unknown format '.txt'"),
    ],
)
def test_bad_input_is_one_line_naming_it(tmp_path, make, options, words):
    path = make(tmp_path)
    spec = json.dumps({str(path): options})
    with pytest.raises(ValueError) as error:
        build_tasks(str(path), spec, seed=0)
    assert re.search(words, _one_line(error))


def test_the_config_refuses_a_missing_file_or_verifier_before_any_model(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Config(tasks=str(tmp_path / "none.jsonl"))
    path = _write(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="cannot be imported"):
        Config(tasks=str(path), task_options=json.dumps({str(path): {"verifier": "nope:f"}}))


def test_the_trainer_reads_the_data_before_the_model(tmp_path, monkeypatch):
    from motg_fast.testing import tiny_config
    from motg_fast.training import trainer as trainer_module

    path = _write(tmp_path / "d.jsonl", ROWS[:3] + [{"question": "q?", "answer": None}])
    loaded = []
    monkeypatch.setattr(trainer_module.Trainer, "_load_policy", lambda *a: loaded.append(1))
    with pytest.raises(ValueError, match="row 3 has no answer"):
        trainer_module.Trainer(tiny_config(tmp_path / "run", tasks=str(path)))
    assert not loaded


def test_the_example_file_is_what_its_script_writes(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make", ROOT / "scripts/make_example_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "out.jsonl")
    assert module.main().read_text() == EXAMPLE.read_text()


@pytest.mark.subprocess
@pytest.mark.slow
def test_train_and_evaluate_on_the_example_file(tiny_dir, tmp_path, capsys):
    from motg_fast import evaluate, train

    common = ["--model", tiny_dir, "--tasks", str(EXAMPLE), "--max_new_tokens", "8"]
    common += ["--task_options", json.dumps({str(EXAMPLE): {"verifier": "math"}})]
    common += ["--heldout_fraction", "0.05", "--eval_questions", "4", "--eval_samples", "2"]
    records = train.main(
        [
            *common,
            "--steps",
            "2",
            "--group_size",
            "2",
            "--prompts_per_step",
            "2",
            "--run_dir",
            str(tmp_path / "run"),
            "--no_progress",
        ]
    )
    assert len(records) == 2
    summary = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert summary["gain"]["questions"] == 4
    result = evaluate.main([*common, "--eval_output", str(tmp_path / "eval.json"), "--no_progress"])
    assert result["tasks"][str(EXAMPLE)]["questions"] == 4
    assert str(EXAMPLE) in capsys.readouterr().out
