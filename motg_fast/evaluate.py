"""Evaluate a model on held-out questions: accuracy, pass@k and format per task.

examples:
  python -m motg_fast.evaluate                                   # the default model and task
  python -m motg_fast.evaluate --model runs/motg --tasks basic_arithmetic,leg_counting
  python -m motg_fast.evaluate --method multiplex --eval_questions 16 --eval_output eval.json

Each question gets --eval_samples completions in the chosen decoding (--k 1 is ordinary
decoding; --method NAME a published mixture method), scored by its task's verifier. The
table is printed and written, with the resolved config, as JSON to --eval_output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import parse_config, run_cli
from .evaluation.heldout import check_writable, evaluate, format_table
from .files import write_json_atomic

PARTS = ("model", "task", "decoding", "evaluation")


@dataclass
class OutputOptions:
    """Where the evaluation JSON goes."""

    eval_output: str = field(
        default="runs/eval.json", metadata={"help": "evaluation JSON path (its folder is made)"}
    )


EXTRAS = (OutputOptions,)


def decoding_name(config) -> str:
    """`discrete`, or the MoT-G mode (prefixed by the method's name when one is set)."""
    spec = config.spec
    mode = "discrete" if spec.k == 1 else f"MoT-G k={spec.k} {spec.selection}/{spec.weighting}"
    return f"{config.method} ({mode})" if config.method else mode


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, evaluate, print the table and write the JSON."""
    from .models import load_model, load_tokenizer, model_summary
    from .tasks.spec import build_tasks

    config, options = parse_config(
        argv,
        parts=PARTS,
        extras=EXTRAS,
        prog="python -m motg_fast.evaluate",
        description=__doc__,
    )
    output = Path(options.eval_output)
    check_writable(output)
    task_set = build_tasks(
        config.tasks,
        config.task_options,
        size=config.dataset_size,
        seed=config.seed,
        heldout_fraction=config.heldout_fraction,
    )
    items = task_set.heldout(config.eval_questions)
    if not items:
        raise ValueError("no held-out items: raise heldout_fraction or dataset_size")
    model = load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        attn_implementation=config.attn_implementation,
    )
    tokenizer = load_tokenizer(config.model)
    mode = decoding_name(config)
    print(f"model: {config.model} ({model_summary(model)})", file=sys.stderr)
    print(
        f"decoding: {mode}, τ={config.temperature}; {len(items)} questions × "
        f"{config.eval_samples} samples, ≤{config.max_new_tokens} new tokens",
        file=sys.stderr,
    )
    result = evaluate(model, tokenizer, config, items)
    result = {"model": config.model, "decoding": mode, **result, "config": config.to_dict()}
    print(format_table(result), flush=True)
    path = write_json_atomic(output, result)
    print(
        f"{result['time_s']:.1f} s, {result['tokens_per_s']:.1f} tokens/s; wrote {path}",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
