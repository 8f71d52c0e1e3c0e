"""Write examples/data/word_problems.jsonl: small arithmetic word problems with their answers.

    python scripts/make_example_data.py

The file shows the format a local task reads (one JSON object per line with `question` and
`answer`; any other column reaches a `module:function` verifier as a keyword) and is small
enough for a CPU smoke run: `python -m motg_fast.train --tasks
examples/data/word_problems.jsonl`. The same seed always writes the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "data" / "word_problems.jsonl"
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana")
THINGS = ("apples", "books", "coins", "shells", "stamps", "marbles")


def problem(rng: random.Random) -> dict:
    """One problem: a name, a thing, two single-digit numbers, added or taken away."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        text = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return {"question": text, "answer": str(a + b), "operation": "add"}
    a, b = max(a, b), min(a, b)
    text = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
    return {"question": text, "answer": str(a - b), "operation": "subtract"}


def main(rows: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps(problem(rng)) + "\n")
    return OUT


if __name__ == "__main__":
    print(f"wrote {main()}")
