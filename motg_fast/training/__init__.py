"""GRPO training: the loop, one optimisation step, the policy scorer, loss, checkpoints."""
