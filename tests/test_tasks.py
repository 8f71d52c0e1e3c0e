"""Task specs, options, weighted mixes and the reproducible, disjoint train/held-out split."""

import random

import pytest

from motg_fast.tasks.base import Task, TaskItem
from motg_fast.tasks.reasoning_gym import (
    PAPER_TASKS,
    available_tasks,
    parse_task_options,
    parse_task_spec,
)
from motg_fast.tasks.spec import build_tasks, check_tasks


def test_paper_preset_has_the_ten_tasks_with_unit_weights():
    weights = parse_task_spec("paper")
    assert list(weights) == list(PAPER_TASKS)
    assert len(weights) == 10 and set(weights.values()) == {1.0}
    assert set(PAPER_TASKS) <= set(available_tasks())


def test_spec_weights_and_order():
    assert parse_task_spec("acre:2, syllogism") == {"acre": 2.0, "syllogism": 1.0}
    mixed = parse_task_spec("leg_counting:0.5,paper:3")
    assert list(mixed)[0] == "leg_counting" and mixed["zebra_puzzles"] == 3.0


def test_unknown_task_is_one_line_listing_valid_tasks():
    with pytest.raises(ValueError) as err:
        parse_task_spec("leg_counting,not_a_task")
    message = str(err.value)
    assert "\n" not in message
    assert "'not_a_task'" in message
    assert "leg_counting" in message and "zebra_puzzles" in message and "paper" in message
    assert "composite" not in available_tasks()


@pytest.mark.parametrize(
    "spec, words",
    [
        ("acre:zero", "bad weight"),
        ("acre:-1", "positive"),
        ("acre,,syllogism", "empty entry"),
        ("acre,acre", "twice"),
        ("paper,acre", "twice"),
    ],
)
def test_malformed_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_task_spec(spec)


@pytest.mark.parametrize(
    "options, words",
    [
        ('{"leg_counting": {"max_legs": 3}}', "has no option 'max_legs'"),
        ('{"leg_counting": {"min_animals": 0}}', "min_animals"),
        ('{"leg_counting": {"seed": 1}}', "set by --seed"),
        ('{"leg_counting": {"size": 5}}', "set by --dataset_size"),
        ('{"syllogism": {}}', "not a task of the spec"),
        ('{"leg_counting": 3}', "must be a JSON object"),
        ('["leg_counting"]', "must be a JSON object"),
        ("{leg_counting: 1}", "not valid JSON"),
        ('{"acre": {"difficulty": 1}}', "acre' has no difficulty levels"),
        ('{"leg_counting": {"difficulty": -1}}', "difficulty"),
    ],
)
def test_bad_task_options_are_one_line_errors_naming_the_option(options, words):
    with pytest.raises(ValueError, match=words) as err:
        check_tasks("leg_counting,acre", options)
    assert "\n" not in str(err.value)


def test_difficulty_uses_the_curriculum_and_options_override_it():
    easy = build_tasks("leg_counting", '{"leg_counting": {"difficulty": 0}}', size=10)
    config = easy.tasks["leg_counting"].dataset.config
    assert (config.min_animals, config.max_animals) == (1, 1)
    tuned = build_tasks(
        "leg_counting", {"leg_counting": {"difficulty": 0, "max_animals": 2}}, size=10
    )
    assert tuned.tasks["leg_counting"].dataset.config.max_animals == 2


def test_star_options_apply_to_every_task_and_skip_difficulty_without_levels():
    per_task = parse_task_options(
        '{"*": {"difficulty": 1}, "acre": {"train": 1}}', ["leg_counting", "acre"]
    )
    assert per_task == {"leg_counting": {"difficulty": 1}, "acre": {"train": 1}}
    check_tasks("leg_counting,acre", '{"*": {"difficulty": 1}}')  # no error for acre


def test_split_sizes_follow_the_heldout_fraction():
    task = build_tasks("basic_arithmetic", size=250, heldout_fraction=0.01).tasks[
        "basic_arithmetic"
    ]
    assert (task.num_train, task.num_heldout) == (247, 3)  # ceil(2.5) held out
    assert list(task.heldout_indices()) == [247, 248, 249]
    assert len(task.heldout()) == 3 and len(task.heldout(2)) == 2


def test_train_and_heldout_never_share_a_question():
    # Easy leg_counting repeats questions often, so index-disjoint is not enough on its own.
    task_set = build_tasks(
        "leg_counting", '{"*": {"difficulty": 0}}', size=300, heldout_fraction=0.1, seed=3
    )
    task = task_set.tasks["leg_counting"]
    heldout = {item.question for item in task.heldout()}
    train_questions = [task.item(i).question for i in range(task.num_train)]
    assert heldout & set(train_questions), "this setting should produce repeated questions"
    drawn = task_set.sample_train(400, random.Random(0))
    assert all(item.index < task.num_train for item in drawn)
    assert not heldout & {item.question for item in drawn}


def test_same_seed_same_items_and_draws():
    def build(seed):
        return build_tasks(
            "leg_counting,basic_arithmetic", size=100, heldout_fraction=0.05, seed=seed
        )

    a, b, c = build(7), build(7), build(8)
    assert [i.question for i in a.heldout()] == [i.question for i in b.heldout()]
    assert [i.question for i in a.heldout()] != [i.question for i in c.heldout()]
    draws_a = a.sample_train(20, random.Random(1))
    draws_b = b.sample_train(20, random.Random(1))
    assert [(i.task, i.index, i.question) for i in draws_a] == [
        (i.task, i.index, i.question) for i in draws_b
    ]


def test_items_do_not_depend_on_generation_order():
    task = build_tasks("syllogism", size=50, seed=5).tasks["syllogism"]
    forward = [task.item(i).question for i in (3, 10, 40)]
    fresh = build_tasks("syllogism", size=50, seed=5).tasks["syllogism"]
    backward = [fresh.item(i).question for i in (40, 10, 3)][::-1]
    assert forward == backward


def test_weighted_mix_follows_the_weights():
    task_set = build_tasks("leg_counting:3,basic_arithmetic:1", size=100, seed=0)
    draws = task_set.sample_train(800, random.Random(0))
    share = sum(item.task == "leg_counting" for item in draws) / len(draws)
    assert 0.70 < share < 0.80
    heldout = task_set.heldout(1)
    assert [item.task for item in heldout] == ["leg_counting", "basic_arithmetic"]


def test_items_carry_their_dataset_scorer_and_tasks_follow_the_protocol():
    task_set = build_tasks("basic_arithmetic", size=20)
    item = task_set.heldout(1)[0]
    assert isinstance(item, TaskItem) and isinstance(task_set.tasks["basic_arithmetic"], Task)
    assert item.scorer(item.answer, item.entry) == 1.0
    assert item.scorer("not a number", item.entry) == 0.0
