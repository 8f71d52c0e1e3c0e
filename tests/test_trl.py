"""MixtureGRPOTrainer (motg_fast.integrations.trl): MoT-G inside TRL's GRPOTrainer.

- k = 1 with `sample` selection reproduces TRL's own GRPOTrainer on the same batch: per-token
  log-probs, entropies, reference and old log-probs, loss and gradients (fp32, 1e-5).
- MoT-G (k = 2, Dirichlet) trains end to end under accelerate (one process; two with DDP in
  the slow test): reward functions see the decoded texts, first-pass ratios are 1, weights
  move.
- The example script runs in a smoke configuration; unsupported TRL options are one-line
  errors; the docs' kernel snippets run and agree with the engine and the training forward.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from motg_fast.integrations.trl import (  # noqa: E402
    ACTION_COLUMNS,
    MixtureGRPOConfig,
    MixtureGRPOTrainer,
    mixture_settings,
    prompt_groups,
    score_actions,
)
from motg_fast.kernels import MixtureSpec  # noqa: E402
from motg_fast.rollout.engine import RolloutEngine  # noqa: E402
from motg_fast.testing import tiny_qwen2, tiny_tokenizer  # noqa: E402
from motg_fast.training.policy import score_trajectories  # noqa: E402
from motg_fast.types import Phase  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the answer is", "think then answer, the end"]  # different lengths: left padding


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS * 4})


def distinct_characters(completions, **kwargs) -> list[float]:
    """A reward that varies within a group on random text."""
    return [float(len(set(c))) for c in completions]


def config_fields(tmp_path, **overrides) -> dict:
    fields = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        temperature=0.8,
        report_to="none",
        bf16=False,
        seed=0,
        save_strategy="no",
        logging_steps=1,
    )
    return {**fields, **overrides}


def spy_logps(trainer) -> list[tuple]:
    """Record every `(logps, entropies)` the trainer's scoring returns."""
    calls = []
    score = trainer._get_per_token_logps_and_entropies

    def recorded(*args, **kwargs):
        out = score(*args, **kwargs)
        calls.append(out[:2])
        return out

    trainer._get_per_token_logps_and_entropies = recorded
    return calls


def masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask.bool()].abs().max())


# --------------------------------------------------------------------------------------
# k = 1: the same numbers as TRL's GRPOTrainer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo"),
        dict(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
        dict(loss_type="cispo", epsilon_high=1.1),
    ],
    ids=["grpo", "dapo-sequence-entropy-mask", "cispo"],
)
def test_k1_sample_matches_trl_grpo_trainer(tmp_path, tiny_dir, dataset, options):
    """Same batch, same weights: log-probs, entropies, ref/old log-probs, loss and grads."""
    fields = config_fields(tmp_path, beta=0.05, steps_per_generation=2, **options)
    tokenizer = tiny_tokenizer()
    ours = MixtureGRPOTrainer(
        model=tiny_dir,
        reward_funcs=distinct_characters,
        args=MixtureGRPOConfig(**fields, mixture_k=1, mixture_selection="sample"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    theirs = GRPOTrainer(
        model=tiny_dir,
        reward_funcs=distinct_characters,
        args=GRPOConfig(**fields),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    batch = ours._generate_and_score_completions([dataset[0]] * 4 + [dataset[1]] * 4)
    mask = batch["completion_mask"]
    assert batch["mixture_ids"].shape == (*mask.shape, 1)

    # Reference and old log-probs (computed by our trainer) against TRL's own forward.
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], mask], dim=1)
    with torch.no_grad():
        score = GRPOTrainer._get_per_token_logps_and_entropies
        ref, _, _ = score(theirs, theirs.ref_model, ids, attention, mask.shape[1])
        old, _, _ = score(theirs, theirs.model, ids, attention, mask.shape[1])
    assert masked_max_diff(batch["ref_per_token_logps"], ref, mask) < 1e-5
    assert masked_max_diff(batch["old_per_token_logps"], old, mask) < 1e-5
    assert masked_max_diff(batch["sampling_per_token_logps"], old, mask) < 1e-5

    # Move both policies off the rollout's (as an optimizer step would): ratios, KL and
    # clipping are then non-trivial.
    noise = torch.Generator().manual_seed(1)
    for p, q in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        delta = 0.02 * torch.randn(p.shape, generator=noise)
        p.data += delta
        q.data += delta
    ours_calls, theirs_calls = spy_logps(ours), spy_logps(theirs)
    ours_loss = ours.compute_loss(ours.model, batch)
    theirs_loss = theirs.compute_loss(theirs.model, batch)
    (ours_logps, ours_entropy), (theirs_logps, theirs_entropy) = ours_calls[0], theirs_calls[0]
    assert masked_max_diff(ours_logps, theirs_logps, mask) < 1e-5
    assert masked_max_diff(ours_entropy, theirs_entropy, mask) < 1e-5
    assert float((ours_logps.detach() - batch["old_per_token_logps"]).abs().max()) > 1e-3
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-6, rel=1e-5)
    ours_loss.backward()
    theirs_loss.backward()
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters(), strict=True):
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= 1e-5 * max(scale, 1.0), name


# --------------------------------------------------------------------------------------
# MoT-G end to end
# --------------------------------------------------------------------------------------


def test_mixture_training_runs_end_to_end(tmp_path, tiny_dir, dataset):
    """k = 2, Dirichlet weights, exact likelihood, β > 0, two micro-batches per rollout."""
    tokenizer = tiny_tokenizer()
    seen = []

    def recorded_reward(completions, completion_ids, **kwargs):
        seen.append((list(completions), [list(c) for c in completion_ids]))
        return distinct_characters(completions)

    args = MixtureGRPOConfig(
        **config_fields(tmp_path, max_steps=2, steps_per_generation=2, beta=0.02),
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        mixture_k=2,
        mixture_weighting="dirichlet",
        mixture_likelihood="exact",
        think_end="w",  # frequent in the random model: rows reach the discrete phase
    )
    trainer = MixtureGRPOTrainer(
        model=tiny_dir,
        reward_funcs=recorded_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batches, calls = [], spy_logps(trainer)
    compute_loss = trainer.compute_loss

    def recorded_loss(model, inputs, *rest, **kwargs):
        batches.append(inputs)
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = recorded_loss
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    texts, ids = seen[0]
    assert texts == tokenizer.batch_decode(ids, skip_special_tokens=True)
    first = batches[0]
    assert set(ACTION_COLUMNS) <= set(first)
    assert first["mixture_weight_logits"].shape[-1] == 2
    phases = set(first["mixture_phase"][first["completion_mask"].bool()].tolist())
    assert {Phase.MIXTURE, Phase.DISCRETE} <= phases
    # First pass (μ = 1): the training forward reproduces the rollout's likelihoods.
    logps = next(lp for lp, ent in calls if ent is not None)  # the loss's call (with entropy)
    mask = first["completion_mask"]
    ratio_to_old = (logps - first["old_per_token_logps"]).exp()
    ratio_to_rollout = (logps - first["sampling_per_token_logps"]).exp()
    assert masked_max_diff(ratio_to_old, torch.ones_like(logps), mask) < 1e-5
    assert masked_max_diff(ratio_to_rollout, torch.ones_like(logps), mask) < 1e-5
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    logged = trainer.state.log_history[0]
    assert 0 < logged["mixture/thinking_token_fraction"] < 1
    assert logged["kl"] >= -1e-6 and logged["grad_norm"] > 0  # k3 ≥ 0 up to rounding
    evaluated = trainer.evaluate(dataset.select(range(2)))  # rollout + loss in eval mode
    assert "eval_loss" in evaluated and "eval_mixture/closed_think_fraction" in evaluated


def test_conversational_prompts(tmp_path, tiny_dir):
    """TRL applies the chat template, `think_start` is appended, rewards get messages."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((completions, completion_ids))
        return distinct_characters([c[0]["content"] for c in completions])

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    trainer = MixtureGRPOTrainer(
        model=tiny_dir,
        reward_funcs=reward,
        args=MixtureGRPOConfig(**config_fields(tmp_path, max_steps=1)),
        train_dataset=Dataset.from_dict({"prompt": conversations * 2}),
        processing_class=tokenizer,
    )
    prompt_ids, _, _ = trainer._tokenize_prompts(conversations)
    opener = tokenizer.encode("<think>")
    assert all(ids[-len(opener) :] == opener for ids in prompt_ids)
    assert tokenizer.decode(prompt_ids[0]) == "user: the answer is\nassistant: <think>"
    trainer.train()
    completions, ids = seen[0]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert [c[0] for c in completions] == [{"role": "assistant", "content": t} for t in texts]


def test_lora_adapters_train_against_the_base_model(tmp_path, tiny_dir, dataset):
    """PEFT: only the adapters move; the reference is the model with adapters off (KL 0 at
    the first step); reentrant checkpointing still reaches adapters behind a frozen embedding."""
    peft = pytest.importorskip("peft")
    args = MixtureGRPOConfig(
        **config_fields(tmp_path, max_steps=2, beta=0.1),
        learning_rate=1e-2,
        mixture_weighting="dirichlet",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer = MixtureGRPOTrainer(
        model=tiny_dir,
        reward_funcs=distinct_characters,
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert moved == trainable and len(trainable) == 8  # A and B of q, v in 2 layers
    first, second = trainer.state.log_history[:2]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and second["kl"] > 0


def test_score_actions_is_the_policy_forward():
    """The integration's ℓ is `score_trajectories`'s (phases mixed), entropy or not."""
    model, tokenizer = tiny_qwen2(), tiny_tokenizer()
    spec = MixtureSpec(k=3, temperature=0.7, selection="sample", weighting="gumbel")
    engine = RolloutEngine(model, tokenizer, max_new_tokens=24, think_end="w")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    traj = engine.generate(prompts, spec, group_size=3, seed=0)
    assert (traj.phase == Phase.DISCRETE).any() and (traj.phase == Phase.MIXTURE).any()
    mask = traj.completion_mask
    for likelihood in spec.likelihoods:
        expected = score_trajectories(model, traj, spec, likelihood=likelihood).action_logprob
        ell, none = score_actions(model, traj, spec, likelihood=likelihood)
        assert none is None and torch.equal(ell, expected)
        ell, entropy = score_actions(model, traj, spec, likelihood=likelihood, return_entropy=True)
        assert torch.equal(ell, expected)
    max_entropy = torch.log(torch.tensor(float(model.config.vocab_size)))
    assert torch.all(entropy[mask] > 0) and torch.all(entropy[mask] <= max_entropy)


# --------------------------------------------------------------------------------------
# Configuration and refusals
# --------------------------------------------------------------------------------------


def test_config_flags_build_the_spec(tmp_path):
    parser = HfArgumentParser(MixtureGRPOConfig)
    argv = ["--output_dir", str(tmp_path), "--bf16", "false", "--temperature", "0.7"]
    argv += ["--mixture_k", "3"]
    argv += ["--mixture_weighting", "gumbel", "--mixture_likelihood", "weighted"]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    expected = MixtureSpec(k=3, temperature=0.7, weighting="gumbel")
    assert args.mixture_spec == expected
    again = MixtureGRPOConfig.from_spec(expected, output_dir=str(tmp_path), bf16=False)
    assert again.mixture_spec == expected and again.temperature == 0.7
    plain = GRPOConfig(str(tmp_path), bf16=False, temperature=0.5)
    spec, likelihood, start, end = mixture_settings(plain)
    assert spec == MixtureSpec(k=2, temperature=0.5) and likelihood == "exact"
    assert (start, end) == ("<think>", "</think>")


def test_prompt_groups():
    assert prompt_groups([[1], [1], [2], [2]]) == ([[1], [2]], 2)
    assert prompt_groups([[1], [1], [2]]) == ([[1], [1], [2]], 1)
    assert prompt_groups([[1, 2], [3]]) == ([[1, 2], [3]], 1)


def _noop(*args, **kwargs):
    return None


@pytest.mark.parametrize(
    "config, trainer_kwargs, message",
    [
        (dict(use_vllm=True), {}, "use_vllm"),
        (dict(use_transformers_continuous_batching=True), {}, "continuous_batching"),
        (dict(top_k=50), {}, "top_k"),
        (dict(top_p=0.9), {}, "top_p"),
        (dict(min_p=0.1), {}, "min_p"),
        (dict(repetition_penalty=1.1), {}, "repetition_penalty"),
        (dict(generation_kwargs={"num_beams": 2}), {}, "generation_kwargs"),
        (dict(cast_lm_head_to_fp32=True), {}, "cast_lm_head_to_fp32"),
        (dict(use_liger_kernel=True), {}, "use_liger_kernel"),
        ({}, dict(tools=[_noop]), "tools"),
        ({}, dict(rollout_func=_noop), "rollout_func"),
        ({}, dict(environment_factory=_noop), "environment_factory"),
    ],
)
def test_unsupported_options_are_one_line_errors(
    tmp_path, tiny_dir, dataset, config, trainer_kwargs, message
):
    try:
        args = MixtureGRPOConfig(**config_fields(tmp_path, **config))
    except ImportError:  # transformers checks some optional packages first
        pytest.skip(f"{config} needs a package that is not installed")
    with pytest.raises(ValueError) as err:
        MixtureGRPOTrainer(
            model=tiny_dir,
            reward_funcs=distinct_characters,
            args=args,
            train_dataset=dataset,
            processing_class=tiny_tokenizer(),
            **trainer_kwargs,
        )
    assert message in str(err.value) and "\n" not in str(err.value)


def _needs_spec_field(name: str):
    return pytest.mark.skipif(
        name not in MixtureSpec.field_names(), reason=f"MixtureSpec has no {name}"
    )


@pytest.mark.parametrize(
    "mixture, message",
    [
        (dict(mixture_k=1, mixture_selection="topk"), "greedy decoding"),
        (dict(mixture_representative="argmax"), "undefined"),
        (dict(mixture_k=1, mixture_top_p=0.9), "top_p"),
        pytest.param(
            dict(mixture_noise_std=0.1), "not supported", marks=_needs_spec_field("noise_std")
        ),
        pytest.param(
            dict(mixture_cold_stop_entropy=0.5),
            "not supported",
            marks=_needs_spec_field("cold_stop_entropy"),
        ),
    ],
)
def test_bad_mixtures_are_one_line_errors(tmp_path, mixture, message):
    with pytest.raises(ValueError) as err:
        MixtureGRPOConfig(**config_fields(tmp_path), **mixture)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------
# The example script
# --------------------------------------------------------------------------------------


def load_example():
    path = ROOT / "examples" / "trl_mixture_grpo.py"
    spec = importlib.util.spec_from_file_location("trl_mixture_grpo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_example_script_smoke_run(tmp_path, tiny_dir):
    example = load_example()
    argv = ["--model", tiny_dir, "--output_dir", str(tmp_path), "--max_steps", "1"]
    argv += ["--num_generations", "2", "--per_device_train_batch_size", "2"]
    argv += ["--max_completion_length", "8", "--num_prompts", "4", "--dataset_size", "20"]
    trainer = example.main(argv)
    logged = trainer.state.log_history[0]
    assert "accuracy" in logged and "rewards/reasoning_gym/mean" in logged
    assert trainer.mixture_spec == MixtureSpec(k=2, temperature=0.9)


# --------------------------------------------------------------------------------------
# The docs' kernel snippets
# --------------------------------------------------------------------------------------


def docs_snippet(name: str) -> dict:
    """Run the python block after `<!-- tested: name -->` in docs/integrations.md."""
    text = (ROOT / "docs" / "integrations.md").read_text()
    found = re.search(rf"<!-- tested: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"no snippet {name!r} in docs/integrations.md"
    namespace: dict = {}
    exec(compile(found.group(1), f"docs/integrations.md:{name}", "exec"), namespace)
    return namespace


def test_docs_decode_loop_matches_the_engine():
    mixture_decode = docs_snippet("decode_loop")["mixture_decode"]
    model, tokenizer = tiny_qwen2(), tiny_tokenizer()
    prompt = torch.tensor([tokenizer.encode("the answer is")] * 2)
    deterministic = MixtureSpec(k=2, representative="argmax")  # top-k, probability weights
    ids, weights, mask, slot = mixture_decode(model, prompt, deterministic, steps=6)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=6, think_end=None, eos_token_ids=[])
    traj = engine.generate(prompt[:1].tolist(), deterministic, group_size=2)
    assert torch.equal(ids, traj.ids) and torch.equal(slot, traj.token_slot)
    assert torch.allclose(weights, traj.weights, atol=1e-5) and torch.equal(mask, traj.mask)
    spec = MixtureSpec(k=2, selection="sample", weighting="dirichlet")
    _, weights, _, _ = mixture_decode(model, prompt, spec, 4, torch.Generator().manual_seed(0))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4))


def test_docs_training_forward_matches_score_trajectories():
    mixture_loglik = docs_snippet("training_forward")["mixture_loglik"]
    model, tokenizer = tiny_qwen2(), tiny_tokenizer()
    spec = MixtureSpec(k=2, temperature=0.9, weighting="dirichlet")
    engine = RolloutEngine(model, tokenizer, max_new_tokens=6, think_end=None, eos_token_ids=[])
    prompt = tokenizer.encode("the answer is")
    traj = engine.generate([prompt], spec, group_size=2, seed=0)
    prompt_ids = torch.tensor([prompt] * 2)
    ell = mixture_loglik(
        model, prompt_ids, traj.ids, traj.weight_logits, traj.mask, traj.token_slot, spec, "exact"
    )
    expected = score_trajectories(model, traj, spec, likelihood="exact").action_logprob
    assert torch.allclose(ell, expected, atol=1e-5)
    ell.sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Two processes (DDP over gloo)
# --------------------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_equal(tmp_path, tiny_dir):
    """Each process rolls out its own prompts; DDP's all-reduce must keep the weights equal."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_machines", "1", "--num_processes", "2", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", "29541"]
    script = str(Path(__file__).parent / "trl_ddp_train.py")
    run = subprocess.run(
        [*launch, script, tiny_dir, str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in reports)
    assert reports[0]["prompts"] != reports[1]["prompts"]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = dict(tiny_qwen2().named_parameters())
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert any(not torch.allclose(w0[n], initial[n]) for n in w0)
