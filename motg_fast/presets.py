"""Named sets of config values applied before a command's flags: presets, published
methods (``--method``) and config files (``--config FILE``, YAML or JSON)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .kernels.spec import METHODS
from .tasks.prompting import SYSTEM_PROMPT


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-5`` as a float (YAML 1.2, JSON) and not a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return Loader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (a directory: its ``config.json``)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        values = yaml.load(path.read_text(), Loader=_yaml_loader())  # noqa: S506 - safe loader
    except OSError:
        raise ValueError(f"config file {str(path)!r} cannot be read") from None
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"config file {str(path)!r} is not valid YAML or JSON: {reason}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return values


def method_values(name: str) -> dict[str, Any]:
    """The config values of `--method NAME`: its spec fields, likelihood, training settings
    and name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    method = METHODS[name]
    return {**method.fields, "likelihood": method.likelihood, **method.training, "method": name}


_PAPER: dict[str, Any] = dict(
    model="Qwen/Qwen2.5-1.5B-Instruct",
    tasks="paper",
    task_options="",
    dataset_size=10_000,
    heldout_fraction=0.01,
    seed=42,
    k=2,
    temperature=0.9,
    selection="sample",
    weighting="prob",
    representative="sample",
    likelihood="weighted",
    max_prompt_tokens=1024,
    max_new_tokens=1024,
    group_size=10,
    prompts_per_step=1,
    grad_accum=4,
    steps=1000,
    lr=5e-6,
    betas=(0.9, 0.99),
    weight_decay=0.1,
    grad_clip=0.1,
    warmup_ratio=0.18,
    beta=0.1,
    mu=1,
    reward_correctness=2.0,
    reward_think=0.5,
    reward_format=0.5,
    reward_partial_credit=True,
    eval_questions=100,
    eval_samples=4,
    eval_every=50,
    save_every=200,
    run_dir="runs/paper",
    system_prompt=SYSTEM_PROMPT,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's runs. The paper trained one task per run: add --tasks NAME.
    "paper": _PAPER,
    # "MoT-G with G = 5 matches standard GRPO with G = 10".
    "paper_g5": {**_PAPER, "group_size": 5, "run_dir": "runs/paper_g5"},
    # The standard-decoding GRPO baseline of the paper's comparisons.
    "paper_discrete": {**_PAPER, "k": 1, "likelihood": "token", "run_dir": "runs/paper_discrete"},
    # A seconds-long check of the whole pipeline on a CPU.
    "smoke": dict(
        max_new_tokens=32,
        eval_questions=2,
        eval_samples=2,
        group_size=2,
        prompts_per_step=1,
        steps=2,
        run_dir="runs/smoke",
    ),
}
"""Named sets of field values, applied before explicit flags (a command takes those of
its own parts)."""
