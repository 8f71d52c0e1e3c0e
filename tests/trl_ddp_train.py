"""Two MixtureGRPOTrainer steps under `accelerate launch` (run by tests/test_trl.py).

    accelerate launch --multi_gpu --num_processes 2 tests/trl_ddp_train.py MODEL_DIR OUT_DIR

Each rank writes `rank{r}.json` (its wrapper class and the prompts its reward saw) and
`rank{r}.pt` (its final weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

from motg_fast.integrations.trl import MixtureGRPOConfig, MixtureGRPOTrainer
from motg_fast.testing import tiny_tokenizer


def main(model_dir: str, out: Path) -> None:
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [float(len(set(c))) for c in completions]

    args = MixtureGRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        max_steps=2,
        learning_rate=1e-2,
        temperature=0.9,
        beta=0.05,
        mixture_k=2,
        mixture_weighting="dirichlet",
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["the answer is", "think", "a b c", "on the end"] * 4})
    trainer = MixtureGRPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({n: p.detach() for n, p in model.named_parameters()}, out / f"rank{rank}.pt")
    report = {"wrapped": type(trainer.model_wrapped).__name__, "prompts": sorted(set(seen))}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
