"""A run's configuration in parts: model, task, decoding, evaluation, training and run.

Each part is a dataclass validated when it is built (one-line ``ValueError`` naming the
field); :class:`Config` holds the parts a job uses, checks what spans parts (the likelihood
against the decoding spec, per-slot clipping), and reads flat (``config.lr`` is
``config.part("training").lr``). Each command parses only its parts (:mod:`motg_fast.cli`):
train all six, evaluate model + task + decoding + evaluation, compare everything but the
run part, which it sets per run.

The decoding part holds every field of :class:`~motg_fast.kernels.MixtureSpec` (flat, so the
flags are ``--k``, ``--temperature``, …); :attr:`DecodingConfig.spec` builds the spec. A new
spec field is a new flag, a saved value and a check with no change here.

A run writes its resolved config as one flat JSON object (:meth:`Config.save`); older
``config.json`` files load too (retired fields are dropped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config_parts import (
    DTYPES,
    FIELD_PART,
    FINAL_EVALS,
    MINIMUMS,
    OLD_LOGPROBS,
    PARTS,
    DecodingConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainingConfig,
)
from .files import write_text_atomic
from .kernels import MixtureSpec
from .models import DEFAULT_MODEL
from .presets import read_config_file

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "FIELD_PART",
    "FINAL_EVALS",
    "MINIMUMS",
    "OLD_LOGPROBS",
    "PARTS",
    "RESUMABLE_CHANGES",
    "RETIRED_FIELDS",
    "Config",
    "DecodingConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TaskConfig",
    "TrainingConfig",
]

RETIRED_FIELDS = frozenset({"eval_output"})
"""Fields of earlier versions that a saved config may hold; loading drops them."""


class Config:
    """The parts of one job (see the module docstring), read flat: ``config.lr``.

    ``Config(**values)`` builds every part from flat field values (the defaults elsewhere);
    ``Config.of(model=ModelConfig(...), ...)`` takes ready parts, only those a job needs.
    """

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(FIELD_PART))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        by_part = {name: {} for name in PARTS}
        for key, value in values.items():
            by_part[FIELD_PART[key]][key] = value
        parts = {name: PARTS[name](**by_part[name]) for name in PARTS}
        self._set_parts(parts)

    @classmethod
    def of(cls, **parts: Any) -> Config:
        """A config of ready parts (``model=ModelConfig(...)``, …); others stay absent."""
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown config part(s): {', '.join(unknown)}")
        config = cls.__new__(cls)
        config._set_parts(parts)
        return config

    def _set_parts(self, parts: dict[str, Any]) -> None:
        object.__setattr__(self, "_parts", {n: parts[n] for n in PARTS if n in parts})
        self._check_across_parts()

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("_parts", {})
        part = FIELD_PART.get(name)
        if part is None:
            raise AttributeError(f"Config has no field {name!r}")
        if part not in parts:
            raise AttributeError(f"this config has no {part} part (field {name!r})")
        return getattr(parts[part], name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only: use config.replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._parts == other._parts

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{n}={p!r}' for n, p in self._parts.items())})"

    @property
    def parts(self) -> tuple[str, ...]:
        """The names of the parts this config holds."""
        return tuple(self._parts)

    def part(self, name: str) -> Any:
        """The part `name` (`"model"`, `"task"`, …; see :data:`PARTS`)."""
        if name not in self._parts:
            raise AttributeError(f"this config has no {name} part")
        return self._parts[name]

    @property
    def spec(self) -> MixtureSpec:
        """The :class:`MixtureSpec` of this config's thinking steps."""
        return self.part("decoding").spec

    def reward_weights(self):
        """The :class:`~motg_fast.tasks.rewards.RewardWeights` of the task part."""
        return self.part("task").reward_weights()

    def _check_across_parts(self) -> None:
        """What spans parts: the likelihood and per-slot clipping against the decoding."""
        if "training" not in self._parts or "decoding" not in self._parts:
            return
        spec, training = self.part("decoding").spec, self.part("training")
        if spec.is_deterministic and spec.is_discrete:
            raise ValueError(
                "k=1 with selection=topk is greedy decoding: there is nothing to learn from "
                "(and no exact likelihood); use selection=sample"
            )
        spec.check_likelihood(training.likelihood)
        if training.clip_per_slot:
            _check_per_slot(spec, training.likelihood)

    # ------------------------------------------------------------------ copies and runs
    def replace(self, **changes: Any) -> Config:
        """A copy with field ``changes`` applied (names checked, parts validated again)."""
        parts = dict(self._parts)
        for name in changes:
            part = FIELD_PART.get(name)
            if part is None:
                raise ValueError(f"unknown config field(s): {name}")
            if part not in parts:
                raise ValueError(f"this config has no {part} part (field {name!r})")
        for part in {FIELD_PART[name] for name in changes}:
            mine = {k: v for k, v in changes.items() if FIELD_PART[k] == part}
            parts[part] = dataclasses.replace(parts[part], **mine)
        return Config.of(**parts)

    def experiment_changes(self, saved: dict[str, Any]) -> list[str]:
        """Fields whose value differs from a saved config's and that alter the experiment
        (anything outside :data:`RESUMABLE_CHANGES`); a resume refuses them."""
        current = self.to_dict()
        return sorted(
            name
            for name, value in saved.items()
            if name in current and name not in RESUMABLE_CHANGES and current[name] != value
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field of every part as one flat JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for part in self._parts.values():
            out.update(dataclasses.asdict(part))
        if "betas" in out:
            out["betas"] = list(out["betas"])
        return out

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the config JSON to ``path`` (a directory gets ``config.json``), atomically."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "config.json"
        return write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A config from a flat dict such as :meth:`to_dict` gives, or an older version's
        (retired fields dropped; unknown keys are an error)."""
        return cls(**{k: v for k, v in values.items() if k not in RETIRED_FIELDS})

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a config file: YAML or JSON (a directory means its ``config.json``)."""
        return cls.from_dict(read_config_file(path))


def _check_per_slot(spec: MixtureSpec, likelihood: str) -> None:
    """clip_per_slot needs a likelihood that is a sum of slot terms: independent draws
    (`iid`) with weights and token fixed by them, scored `exact`."""
    fixed = spec.weighting in ("prob", "uniform") and spec.representative != "sample"
    if spec.selection != "iid" or not fixed or likelihood != "exact" or spec.noise_std > 0:
        raise ValueError(
            "clip_per_slot clips each slot's ratio, which needs a likelihood that is a sum of "
            "slot terms: selection=iid, weighting=prob or uniform, representative=first or "
            "argmax, noise_std=0 and likelihood=exact"
        )


# Fields a resumed run may change: its length, evaluation and checkpoint cadence, outputs,
# progress display, device placement and memory knobs (micro-batches, activation
# checkpointing, attention kernel, gradient summation order) — none changes what is trained or
# how it is sampled.
RESUMABLE_CHANGES = frozenset(
    {
        *(f.name for f in dataclasses.fields(RunConfig)),
        *(f.name for f in dataclasses.fields(EvalConfig)),
        "steps",
        "eval_every",
        "device",
        "attn_implementation",
        "grad_accum",
        "gradient_checkpointing",
        "deterministic",
        "share_prompt",
    }
)
