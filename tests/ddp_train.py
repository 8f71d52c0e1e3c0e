"""Train a tiny model on the toy task; run directly or under `accelerate launch`.

python tests/ddp_train.py RUN_DIR PROMPTS_PER_PROCESS STEPS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from motg_fast.config import Config  # noqa: E402
from motg_fast.trainer import Trainer  # noqa: E402
from tiny_models import tiny_qwen2, tiny_tokenizer  # noqa: E402
from toy_task import ToyTasks, letter_reward  # noqa: E402


def main(run_dir: str, prompts: int, steps: int, accelerator=None) -> None:
    config = Config(
        model="tiny",
        tasks="leg_counting",
        run_dir=run_dir,
        seed=5,
        k=2,
        selection="sample",
        weighting="gumbel",
        likelihood="exact",
        temperature=1.0,
        group_size=3,
        prompts_per_step=prompts,
        rollout_batch_prompts=1,
        grad_accum=1,
        steps=steps,
        lr=1e-2,
        max_new_tokens=6,
        max_prompt_tokens=64,
        save_every=0,
        progress=False,
        beta=0.05,
        aggregation="dapo",
        warmup_ratio=1.0,
        system_prompt="Answer.",
        final_eval="none",
    )
    Trainer(
        config,
        model=tiny_qwen2().train(),
        tokenizer=tiny_tokenizer(),
        task_set=ToyTasks(),
        reward_fn=letter_reward,
        accelerator=accelerator,
    ).train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
