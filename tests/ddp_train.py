"""Train a tiny model on the toy task; run directly or under `accelerate launch`.

python tests/ddp_train.py RUN_DIR PROMPTS_PER_PROCESS STEPS [CONFIG_JSON]

CONFIG_JSON: config changes, e.g. '{"grad_accum": 2, "mu": 2}'.
"""

import json
import sys

from motg_fast.testing import ToyTasks, letter_reward, tiny_config, tiny_qwen2, tiny_tokenizer
from motg_fast.training.trainer import Trainer


def main(run_dir: str, prompts: int, steps: int, accelerator=None, **changes) -> None:
    values = dict(
        model="tiny",
        seed=5,
        k=2,
        selection="sample",
        weighting="gumbel",
        likelihood="exact",
        group_size=3,
        prompts_per_step=prompts,
        rollout_batch_prompts=1,
        grad_accum=1,
        steps=steps,
        lr=1e-2,
        max_new_tokens=6,
        beta=0.05,
        aggregation="dapo",
        warmup_ratio=1.0,
    )
    config = tiny_config(run_dir, **{**values, **changes})
    Trainer(
        config,
        model=tiny_qwen2().train(),
        tokenizer=tiny_tokenizer(),
        task_set=ToyTasks(),
        reward_fn=letter_reward,
        accelerator=accelerator,
    ).train()


if __name__ == "__main__":
    changes = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), **changes)
