"""A trivially learnable task for trainer tests: the reward counts the letter "a"."""

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class ToyItem:
    task: str
    question: str


class ToyTasks:
    """Questions "say a N"; a task set with the interface the trainer needs."""

    names = ["letters"]

    def sample_train(self, n: int, rng: random.Random) -> list[ToyItem]:
        return [ToyItem("letters", f"say a {rng.randrange(10)}") for _ in range(n)]

    def heldout(self, per_task=None) -> list[ToyItem]:
        return [ToyItem("letters", "say a")]


def letter_reward(completions: list[str], items: list) -> tuple[list[float], list[float]]:
    """Reward: occurrences of "a" / 8; correct when above 0.5."""
    rewards = [text.count("a") / 8 for text in completions]
    return rewards, [float(r > 0.5) for r in rewards]
