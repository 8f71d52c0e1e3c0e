"""Rewards (Reasoning Gym scoring of the <answer> text + format terms) and the prompt format."""

import json
import math

import pytest

from motg_fast.tasks.prompting import (
    DEFAULT_SYSTEM_PROMPT,
    THINK_START,
    build_prompt,
    plain_prompt,
)
from motg_fast.tasks.reasoning_gym import PAPER_TASKS
from motg_fast.tasks.rewards import (
    RewardWeights,
    answer_format_ok,
    extract_answer,
    safe_score,
    score_completion,
    score_items,
    think_closed,
)
from motg_fast.tasks.spec import build_tasks
from motg_fast.testing import tiny_tokenizer

NONE_ANSWER_TASKS = ("graph_color", "propositional_logic", "rubiks_cube")
REFERENCE_KEYS = ("possible_answer", "example_answer", "example_correct_answer")


def reference_answer(item) -> str:
    """The item's reference answer as text (from the metadata where `answer` is None)."""
    if item.answer is not None:
        return item.answer
    metadata = item.entry["metadata"]
    value = next(metadata[key] for key in REFERENCE_KEYS if key in metadata)
    return value if isinstance(value, str) else json.dumps(value)


def formatted(answer: str) -> str:
    return f" some reasoning\n</think>\n<answer>{answer}</answer>"


@pytest.fixture(scope="module")
def task_set():
    tasks = ",".join(PAPER_TASKS + ("propositional_logic", "rubiks_cube"))
    return build_tasks(tasks, size=6, heldout_fraction=0.5, seed=42)


@pytest.mark.parametrize("task", PAPER_TASKS + ("propositional_logic", "rubiks_cube"))
def test_reference_answers_score_one_and_wrong_ones_do_not(task_set, task):
    items = task_set.tasks[task].heldout()
    if task in NONE_ANSWER_TASKS:
        assert all(item.answer is None for item in items)
    strict = RewardWeights(correctness=2.0, think=0.5, format=0.5, partial_credit=False)
    for item in items:
        good = score_items([formatted(reference_answer(item))], [item], strict)[0]
        assert good.correct and good.score == 1.0
        assert good.reward == pytest.approx(2.0 + 0.5 + 0.5)
        wrong_answers = ["definitely not the answer", "[[[", "{'a': }", "× × ×", "1e999999"]
        if item.answer is not None:  # one right answer: another item's differing one is wrong
            others = {other.answer for other in task_set.tasks[task].heldout()}
            wrong_answers += [a for a in others if a != item.answer]
        for wrong in wrong_answers:
            bad = score_items([formatted(wrong)], [item], strict)[0]
            assert not bad.correct and bad.score < 1.0
            assert bad.reward == pytest.approx(1.0)  # format terms only, no correctness


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "no tags at all, the answer is 42",
        "</think> <answer>unclosed",
        "</think> answer>42</answer>",
        "<answer></answer>",
        "\x00\xff<answer>\udcff</answer>",
    ],
)
@pytest.mark.parametrize("task", PAPER_TASKS + ("propositional_logic", "rubiks_cube"))
def test_malformed_completions_score_zero_and_never_raise(task_set, task, completion):
    item = task_set.tasks[task].heldout(1)[0]
    result = score_items([completion], [item])[0]
    assert not result.correct and result.score < 1.0
    assert not result.answer_format
    if result.answer is None:  # nothing to score: exactly 0
        assert result.score == 0.0
    weights = RewardWeights(correctness=2.0, think=0.5, format=0.5, partial_credit=False)
    strict = score_items([completion], [item], weights)[0]
    assert strict.reward == 0.5 * strict.think_closed  # no correctness, no answer format


def test_scorer_errors_and_non_finite_scores_give_zero():
    def raises(answer, entry):
        raise ValueError("malformed")

    assert safe_score(raises, "x", {}) == 0.0
    assert safe_score(lambda a, e: math.nan, "x", {}) == 0.0
    assert safe_score(lambda a, e: 7.0, "x", {}) == 1.0
    assert safe_score(lambda a, e: -1.0, "x", {}) == 0.0
    assert safe_score(lambda a, e: 1.0, None, {}) == 0.0  # no answer: never asked


def test_answer_extraction_takes_the_last_closed_answer():
    assert extract_answer("<answer> 3 </answer> then <answer>\n4\n</answer>") == "4"
    assert extract_answer("<answer>5") is None
    assert extract_answer("<answer>a\nb</answer>") == "a\nb"


@pytest.mark.parametrize(
    "completion, closed, ok",
    [
        (" x </think>\n<answer>1</answer>\n", True, True),
        (" x </think><answer>1</answer>", True, True),
        (" x </think> y </think><answer>1</answer>", False, False),
        (" x </think><answer>1</answer><answer>2</answer>", True, False),
        (" x </think><answer>1</answer> trailing text", True, False),
        (" x <answer>1</answer></think>", True, False),
        (" x <answer>1</answer>", False, False),
    ],
)
def test_format_terms(completion, closed, ok):
    assert think_closed(completion) is closed
    assert answer_format_ok(completion) is ok


def test_reward_weights_and_partial_credit():
    entry = {"answer": "abc"}

    def partial(answer, e):
        return 0.25

    text = " t </think><answer>ab</answer>"
    default = score_completion(text, entry, partial)
    assert default.score == 0.25 and not default.correct
    assert default.reward == pytest.approx(2 * 0.25 + 0.0 + 0.25)
    paper = score_completion(text, entry, partial, RewardWeights(2.0, 0.5, 0.5))
    assert paper.reward == pytest.approx(2 * 0.25 + 0.5 + 0.5)
    custom = RewardWeights(correctness=1.0, think=0.1, format=0.0, partial_credit=False)
    assert score_completion(text, entry, partial, custom).reward == pytest.approx(0.1)
    as_dict = paper.to_dict()
    assert set(as_dict) == {
        "reward",
        "score",
        "correct",
        "think_closed",
        "answer_format",
        "answer",
        "scorer_error",
    }
    assert as_dict["scorer_error"] is None


# --------------------------------------------------------------------------- prompting
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_prompt_uses_the_chat_template_and_prefills_think():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = build_prompt(tokenizer, "What is 2+2?")
    assert (
        prompt.text
        == f"<|system|>{DEFAULT_SYSTEM_PROMPT}\n<|user|>What is 2+2?\n<|assistant|><think>"
    )
    assert prompt.ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt.ids) == prompt.text and not prompt.truncated


def test_templates_without_a_system_role_get_the_instructions_in_the_user_turn():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    prompt = build_prompt(tokenizer, "Q?", system_prompt="S.")
    assert prompt.text == "<|user|>S.\n\nQ?\n<|assistant|><think>"


def test_prompt_fallback_without_chat_template():
    tokenizer = tiny_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    prompt = build_prompt(tokenizer, "Q?", system_prompt="S.")
    assert prompt.text == plain_prompt("Q?", "S.") + THINK_START
    assert prompt.text.startswith("S.") and "Question: Q?" in prompt.text


def test_long_questions_are_cut_in_the_middle_to_fit():
    tokenizer = tiny_tokenizer()
    question = "BEGIN " + "filler words " * 200 + "the actual question END"
    prompt = build_prompt(tokenizer, question, system_prompt="S.", max_prompt_tokens=120)
    assert prompt.truncated and len(prompt.ids) <= 120
    assert "BEGIN" in prompt.text and "END" in prompt.text and prompt.text.endswith(THINK_START)
    with pytest.raises(ValueError, match="too small"):
        build_prompt(tokenizer, question, max_prompt_tokens=10)
