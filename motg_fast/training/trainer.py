"""GRPO trainer in the mixture space (or with discrete tokens, the baseline).

One training step:
    sample prompts → rollouts (engine, no grad) → rewards → group advantages →
    μ optimisation passes, each over micro-batches with gradient accumulation, each ending
    in one optimizer step (clip, AdamW, warm-up schedule).

The optimisation (`step.GRPOStep`) scores actions with the training forward
(`policy.score_trajectories`: `mixture_embed` → decoder → `mixture_logprobs` → the configured
likelihood), old log-likelihoods from the rollout or one no-grad forward, the loss
(`grpo.grpo_loss`) and the optimizer. A frozen reference model exists only when β > 0.

Scale-out: under `accelerate launch`, every process rolls out its own prompt groups
(`prompts_per_step` is per process), gradients are averaged by DDP, metrics are averaged
across processes. Loss normalisers are global, so N processes with B prompts each follow
the same trajectory as one process with N·B prompts.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..evaluation.heldout import evaluate, format_gain_table, heldout_gain, result_of
from ..files import write_json_atomic
from ..rollout.engine import RolloutEngine
from ..seeding import derived_seed
from ..tasks.prompting import THINK_END, build_prompts
from ..tasks.rewards import RewardFn, safe_rewards, task_reward
from ..types import Phase, Trajectories
from . import sharded
from .checkpoint import (
    LoadedCheckpoint,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    prepare_run_dir,
    remove_stale_writes,
    save_checkpoint,
    set_rng_state,
)
from .distributed import full_parameters, full_state_dict, make_accelerator, tracker_config
from .grpo import group_advantages
from .metrics import MetricsLog, StallGuard, plot_metrics, signal_statistics, token_statistics
from .report import write_report
from .step import GRPOStep, PolicyScorer

EVAL_BEFORE = "eval_before.json"  # held-out evaluation of the model before training
EVAL_AFTER = "eval_after.json"  # … and of the trained policy
HELDOUT_SUMMARY = "heldout.json"  # both summaries and the gains with their intervals


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup_steps` optimizer steps, then constant."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def format_record(record: dict, steps: int) -> str:
    """One line of a step's headline metrics (printed when the progress bar is off)."""
    return (
        f"step {record['step']}/{steps}: reward {record['reward']:.3f}, "
        f"accuracy {record['correct']:.3f}, loss {record['loss']:.4f}, "
        f"length {record['completion_length']:.1f}, "
        f"{record['generated_tokens_per_s']:.0f} tokens/s"
    )


class Trainer:
    """GRPO in the mixture space on Reasoning Gym (see the module docstring).

    Args:
        config: the run's `Config` (validated here).
        model: an optional ready model (tests); loaded from `config.model` otherwise.
        tokenizer: its tokenizer (loaded with the model when None).
        task_set: optional task set with `sample_train(n, rng)` and `heldout(per_task)`;
            built from `config.tasks` otherwise.
        reward_fn: optional `(completions, items) -> (rewards, correct)`.
    """

    def __init__(
        self,
        config,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        task_set=None,
        reward_fn: RewardFn | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.accelerator = accelerator or make_accelerator(
            config.device, config.report_to, config.run_dir
        )
        prepare_run_dir(
            self.run_dir,
            resume=config.resume,
            overwrite=config.overwrite,
            main=self.accelerator.is_main_process,
        )
        self.resumed = self._resumed_checkpoint()
        self.rank = self.accelerator.process_index
        self.task_set = task_set if task_set is not None else self._build_tasks()
        self.model, self.tokenizer = self._load_policy(model, tokenizer)
        self.ref_model = self._reference_model() if config.beta > 0 else None
        self.reward_fn = reward_fn or task_reward(config.reward_weights())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
            fused=self.accelerator.num_processes == 1,  # in place: no parameter-sized temporaries
        )
        total_updates = config.steps * config.mu
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_constant(round(config.warmup_ratio * total_updates))
        )
        # The scheduler stays unprepared: accelerate would step it once per process.
        self.scorer, self.optimizer = self.accelerator.prepare(
            PolicyScorer(self.model), self.optimizer
        )
        self.step = GRPOStep(
            config, self.accelerator, self.scorer, self.optimizer, self.scheduler, self.ref_model
        )
        options = dict(max_new_tokens=config.max_new_tokens, compile_decode=config.compile_decode)
        self.engine = RolloutEngine(self.model, self.tokenizer, think_end=THINK_END, **options)
        self.start_step = 0
        self.reward_failures = 0
        self.generated_tokens = 0  # by every rollout so far (all processes)
        if self.resumed is not None:
            self._restore(self.resumed)
        if self.accelerator.is_main_process:
            remove_stale_writes(self.run_dir)
        self.metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.start_step)
            if self.accelerator.is_main_process
            else None
        )

    # ----------------------------------------------------------------- setup
    def _load_policy(self, model, tokenizer):
        from ..models import load_model, load_tokenizer

        source = str(self.resumed.model_dir) if self.resumed else self.config.model
        if model is None:
            model = load_model(
                source,
                device=self.accelerator.device,
                dtype=self.training_dtype(),
                attn_implementation=self.config.attn_implementation,
            )
        elif self.resumed is not None:
            model.load_state_dict(type(model).from_pretrained(source).state_dict())
        if tokenizer is None:
            tokenizer = load_tokenizer(source)
        if self.config.gradient_checkpointing:
            # Non-reentrant: gradients reach the prompt K/V the shared prompt forward passes on.
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5.25+
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        model.train()
        return model, tokenizer

    def training_dtype(self) -> str:
        """Weights dtype: float32 master weights unless set (bf16 compute comes from autocast)."""
        return "float32" if self.config.dtype == "auto" else self.config.dtype

    def _reference_model(self) -> torch.nn.Module:
        """A frozen copy of the initial policy (on resume: reloaded from `config.model`)."""
        if self.resumed is not None:
            from ..models import load_model

            ref = load_model(
                self.config.model,
                device=self.accelerator.device,
                dtype=self.training_dtype(),
                attn_implementation=self.config.attn_implementation,
            )
        else:
            ref = copy.deepcopy(self.model)
        ref.eval().requires_grad_(False)
        return ref

    def _build_tasks(self):
        from ..tasks.spec import build_tasks

        c = self.config
        return build_tasks(
            c.tasks,
            c.task_options,
            size=c.dataset_size,
            seed=c.seed,
            heldout_fraction=c.heldout_fraction,
        )

    def _resumed_checkpoint(self) -> LoadedCheckpoint | None:
        """The checkpoint to resume from (None for a new run); refuses a config that changes
        the experiment, naming the fields, before anything is loaded."""
        if not self.config.resume:
            return None
        ckpt = latest_checkpoint(self.run_dir)
        world = self.accelerator.num_processes
        sharded.check_resumable(ckpt.state, world, sharded.is_sharded(self.accelerator))
        changed = self.config.experiment_changes(ckpt.state.get("config", {}))
        if changed:
            saved = ckpt.state["config"]
            listing = ", ".join(f"{name} ({saved[name]!r} in the run)" for name in changed)
            raise ValueError(
                f"cannot resume {self.run_dir} with a changed experiment: {listing}; "
                "resume with the run's values, or start a new run in another --run_dir"
            )
        return ckpt

    def _restore(self, ckpt: LoadedCheckpoint) -> None:
        if sharded.is_sharded(self.accelerator):
            sharded.load_sharded(self.scorer, self.optimizer, ckpt.path)
        else:
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        set_rng_state(ckpt.state["rng"])
        self.start_step = ckpt.step
        self.reward_failures = int(ckpt.state.get("reward_failures", 0))
        self.generated_tokens = int(ckpt.state.get("generated_tokens", 0))
        if self.accelerator.is_main_process:  # newer checkpoints were damaged: drop them
            for path in list_checkpoints(self.run_dir):
                if path != ckpt.path and checkpoint_step(path) > ckpt.step:
                    shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- one step
    @torch.no_grad()
    def step_items(self, step: int) -> tuple[list, int]:
        """This process's prompts for `step` and the global index of the first one.

        The global batch (`prompts_per_step` × processes) is drawn from one seed and sliced
        by rank, so it does not depend on how many processes share it.
        """
        c = self.config
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rng = random.Random(derived_seed(c.seed, step, 0, "prompts"))
        items = self.task_set.sample_train(c.prompts_per_step * world, rng)
        first = rank * c.prompts_per_step
        return items[first : first + c.prompts_per_step], first

    @torch.no_grad()
    def rollout(self, step: int) -> Trajectories:
        """Generate G trajectories for each of this process's prompts at `step`, reward them.

        Prompts go to the engine `rollout_batch_prompts` at a time (0: all at once); each
        call is seeded by its first prompt's global index, so the trajectories of a prompt
        depend only on (seed, step, global batch layout), not on the number of processes.
        """
        c = self.config
        items, first = self.step_items(step)
        prompts = build_prompts(
            self.tokenizer,
            [item.question for item in items],
            system_prompt=c.system_prompt,
            max_prompt_tokens=c.max_prompt_tokens,
        )
        chunk = c.rollout_batch_prompts or len(items)
        parts = []
        self.model.eval()
        with self.accelerator.autocast(), full_parameters(self.scorer):
            for start in range(0, len(items), chunk):
                parts.append(
                    self.engine.generate(
                        [p.ids for p in prompts[start : start + chunk]],
                        c.spec,
                        group_size=c.group_size,
                        seed=derived_seed(c.seed, step, first + start, "rollout"),
                    )
                )
        self.model.train()
        traj = Trajectories.concat(parts)
        expanded = [item for item in items for _ in range(c.group_size)]
        rewards, correct, report = safe_rewards(self.reward_fn, traj.texts, expanded)
        self.reward_failures += report.failures
        traj.rewards = torch.tensor(rewards, device=traj.ids.device)
        traj.correct = torch.tensor(correct, device=traj.ids.device)
        if report.format_only is not None:
            traj.format_only = torch.tensor(report.format_only, device=traj.ids.device)
        return traj

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step (rollout + optimisation); returns its metrics (averaged over ranks)."""
        c = self.config
        start = time.perf_counter()
        traj = self.rollout(step)
        rollout_time = time.perf_counter() - start
        advantages = group_advantages(traj.rewards, c.group_size, scaling=c.advantage_scaling).to(
            traj.rewards.device
        )
        start = time.perf_counter()
        record = self.step(traj, advantages)
        train_time = time.perf_counter() - start
        lengths = traj.lengths.float()
        record.update(token_statistics(traj))
        record.update(signal_statistics(traj.rewards, c.group_size, traj.format_only))
        record.update(
            reward=float(traj.rewards.mean()),
            correct=float(traj.correct.mean()),
            completion_length=float(lengths.mean()),
            thinking_length=float((traj.phase == Phase.MIXTURE).sum(-1).float().mean()),
            closed_thinking=float((traj.phase == Phase.DISCRETE).any(-1).float().mean()),
            rollout_time=rollout_time,
            train_time=train_time,
            generated_tokens_per_s=float(lengths.sum()) / max(rollout_time, 1e-9),
            reward_failures=float(self.reward_failures),
            step_tokens=self.step.global_sum(float(traj.num_tokens)),  # all processes' rollouts
        )
        return self._reduce(record)

    def _reduce(self, record: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return record
        keys = sorted(record)
        values = torch.tensor(
            [record[k] for k in keys], dtype=torch.float64, device=self.accelerator.device
        )
        mean = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, mean.tolist()))

    # ----------------------------------------------------------------- the run
    def save(self, step: int) -> Path | None:
        """Checkpoint after `step` (main process writes; every process waits; under FSDP2
        each process writes its shards first: `motg_fast.training.sharded`)."""
        self.accelerator.wait_for_everyone()
        path = None
        staging = sharded.save_sharded(
            self.accelerator, self.scorer, self.optimizer, self.run_dir, step
        )
        weights = full_state_dict(self.accelerator, self.scorer)  # FSDP2 only (else None)
        if self.accelerator.is_main_process:
            state = {
                **({} if staging else {"optimizer": self.optimizer.state_dict()}),
                "world_size": self.accelerator.num_processes,
                "scheduler": self.scheduler.state_dict(),
                "config": self.config.to_dict(),
                "reward_failures": self.reward_failures,
                "generated_tokens": self.generated_tokens,
            }
            path = save_checkpoint(
                self.run_dir,
                step,
                self.accelerator.unwrap_model(self.scorer).model,
                self.tokenizer,
                state,
                keep=self.config.keep_checkpoints,
                state_dict=weights,
                staging=staging,
            )
        self.accelerator.wait_for_everyone()
        return path

    def budget_spent(self) -> bool:
        """Whether the rollouts have generated `token_budget` tokens (never with no budget)."""
        budget = self.config.token_budget
        return bool(budget) and self.generated_tokens >= budget

    def heldout_result(self) -> dict[str, Any]:
        """Evaluate the held-out items (`eval_questions` per task) with the evaluate code.

        Called on every process: each generates a shard of the items, under the same
        autocast as the rollouts and with the trainer's engine; every process gets the
        result of all of them (evaluate's JSON: per task, overall and per completion).
        """
        from accelerate.utils import gather_object

        world = self.accelerator.num_processes
        items = self.task_set.heldout(self.config.eval_questions)[self.rank :: world]
        records, tokens, start = [], 0, time.perf_counter()
        if items:
            self.model.eval()
            try:
                with self.accelerator.autocast(), full_parameters(self.scorer):
                    result = evaluate(
                        self.model,
                        self.tokenizer,
                        self.config,
                        items,
                        engine=self.engine,
                        progress=False,
                    )
            finally:
                self.model.train()
            records, tokens = result["completions"], result["tokens"]
        if world > 1:
            records = gather_object(records)
            tokens = int(self.step.global_sum(float(tokens)))
        elapsed = time.perf_counter() - start
        return result_of(records, self.config.eval_samples, time_s=elapsed, tokens=tokens)

    def evaluate_heldout(self) -> dict[str, float]:
        """`{"heldout_accuracy": …}` of :meth:`heldout_result`."""
        return {"heldout_accuracy": self.heldout_result()["overall"]["accuracy"]}

    def baseline_evaluation(self) -> dict[str, Any] | None:
        """The held-out result of the model before training (`eval_before.json`): read back
        when the run already has it, else evaluated now (only before the first step)."""
        path = self.run_dir / EVAL_BEFORE
        if path.exists():
            return json.loads(path.read_text())
        if self.start_step > 0:
            if self.accelerator.is_main_process:
                tqdm.write(f"no {EVAL_BEFORE} in {self.run_dir}: no before/after comparison")
            return None
        result = self.heldout_result()
        if self.accelerator.is_main_process:
            write_json_atomic(path, result)
        return result

    def final_evaluation(self, before: dict[str, Any] | None) -> dict[str, Any]:
        """Evaluate the trained policy (`eval_after.json`) and, with a baseline, the gain
        table (`heldout.json`, printed)."""
        after = self.heldout_result()
        summary: dict[str, Any] = {"after": after["overall"]}
        if before is not None:
            summary["before"] = before["overall"]
            summary["gain"] = heldout_gain(before, after)
        if self.accelerator.is_main_process:
            write_json_atomic(self.run_dir / EVAL_AFTER, after)
            write_json_atomic(self.run_dir / HELDOUT_SUMMARY, summary)
            if before is not None:
                print(format_gain_table(summary["gain"]), flush=True)
        return summary

    def train(self) -> list[dict]:
        """Run from the start (or the resumed) step to `config.steps`; returns the metrics."""
        c = self.config
        if self.accelerator.is_main_process:
            c.save(self.run_dir)
        self.accelerator.init_trackers(self.run_dir.name, config=tracker_config(c))
        finished = self.start_step >= c.steps or self.budget_spent()
        if self.accelerator.is_main_process and not finished:
            for stale in (EVAL_AFTER, HELDOUT_SUMMARY):  # of a shorter run being extended
                (self.run_dir / stale).unlink(missing_ok=True)
        before = self.baseline_evaluation() if c.final_eval == "before_after" else None
        guard = StallGuard()
        bar = tqdm(
            range(self.start_step, c.steps),
            initial=self.start_step,
            total=c.steps,
            disable=not self.accelerator.is_main_process or not c.progress,
            desc="train",
        )
        for step in bar:
            if self.budget_spent():
                break
            record = {"step": step + 1, **self.train_step(step)}
            self.generated_tokens += int(record["step_tokens"])
            record["generated_tokens"] = float(self.generated_tokens)
            done = step + 1
            if c.eval_every and done % c.eval_every == 0:
                record.update(self.evaluate_heldout())
            stall = guard.update(record)
            if self.metrics is not None:
                self.metrics.append(record)
                if not c.progress and done % c.log_every == 0:
                    tqdm.write(format_record(record, c.steps))
                if stall:
                    tqdm.write(stall)
            self.accelerator.log(record, step=done)
            postfix = dict(reward=f"{record['reward']:.3f}", acc=f"{record['correct']:.2f}")
            postfix["tok_s"] = f"{record['generated_tokens_per_s']:.0f}"
            if guard.streak:
                postfix["stalled"] = guard.streak
            bar.set_postfix(**postfix)
            if (c.save_every and done % c.save_every == 0) or done == c.steps:
                self.save(done)
            elif self.budget_spent():  # the last step of a token-budget run
                self.save(done)
        if c.final_eval != "none" and not (self.run_dir / HELDOUT_SUMMARY).exists():
            sharded.free_optimizer_state(self.optimizer)  # saved with the last checkpoint
            summary = self.final_evaluation(before)
            self.accelerator.log(
                {f"heldout_{key}": value for key, value in summary["after"].items()}, step=c.steps
            )
        self.accelerator.end_training()
        records = self.metrics.read() if self.metrics is not None else []
        if self.accelerator.is_main_process:
            plot_metrics(records, self.run_dir / "plots")
            summary_path = self.run_dir / HELDOUT_SUMMARY
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
            write_report(self.run_dir, records, summary, device=str(self.accelerator.device))
        return records
