"""One TRL GRPO step: `MixtureGRPOTrainer` (MoT-G k = 2, and k = 1) vs TRL's `GRPOTrainer`.

    pytest bench/bench_trl_step.py --benchmark-only -s

Both trainers start from the same weights with the same `GRPOConfig` (one prompt of
G = 4 completions per step, 32 new tokens, no reference model, fp32, gradient
checkpointing off) and both generate the full length (EOS disabled: `min_new_tokens` for
TRL's `generate`, no EOS id for the engine). A step is TRL's own optimizer step: the
rollout and its scoring (`_generate_and_score_completions`), the loss, backward and AdamW.
Ours rolls out with `RolloutEngine` (shared prefill, preallocated cache, mixture steps) and
scores with `mixture_embed` → model → `mixture_logprobs`; TRL's with `model.generate` and
its fused LM head. Reported: the fastest step and the fastest generation of each (over
rounds of `STEPS` steps after a warm-up step), in wall time and, on the CPU (one thread),
process CPU time.

CPU: a tiny random Qwen2 (hidden 128, 4 layers, as bench_train_step.py), one intra-op
thread. CUDA (not run yet): a Qwen2.5-1.5B-shaped random model, bf16 autocast, 256 new
tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from transformers import Qwen2ForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from motg_fast.integrations.trl import MixtureGRPOConfig, MixtureGRPOTrainer
from motg_fast.testing import qwen25_1p5b_config, tiny_qwen2, tiny_tokenizer

HAS_CUDA = torch.cuda.is_available()
STEPS = 3
MIXTURES = {  # our trainer's runs: MoT-G, and k = 1 sampling (TRL's decoding, our engine)
    "ours": dict(mixture_k=2, mixture_weighting="dirichlet"),
    "ours_k1": dict(mixture_k=1, mixture_selection="sample"),
}


def clock() -> tuple[float, float]:
    """`(wall, process CPU)` seconds (after a device synchronisation on CUDA)."""
    if HAS_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


class StepTimer(TrainerCallback):
    """`(wall, CPU)` time of each optimizer step (rollout, loss, backward, optimizer)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self.start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(elapsed(self.start))


def time_generation(trainer) -> list[tuple[float, float]]:
    """Record the `(wall, CPU)` time of each `_generate_and_score_completions` call."""
    times: list[tuple[float, float]] = []
    generate = trainer._generate_and_score_completions

    def timed(inputs):
        start = clock()
        out = generate(inputs)
        times.append(elapsed(start))
        return out

    trainer._generate_and_score_completions = timed
    return times


def build(kind: str, make_model, new_tokens: int, out: Path, tokenizer=None):
    """A trainer of `kind` (a key of `MIXTURES`, or "trl") on a fresh `make_model()`, with
    its step and generation timers."""
    fields = dict(
        output_dir=str(out / kind),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=new_tokens,
        max_steps=STEPS + 1,
        temperature=0.9,
        learning_rate=1e-6,
        beta=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        bf16=HAS_CUDA,
        gradient_checkpointing=False,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": ["Question: what is 12 + 30? Answer:"] * 8})
    reward = lambda completions, **kwargs: [float(len(set(c))) for c in completions]  # noqa: E731
    common = dict(model=make_model(), reward_funcs=reward, train_dataset=dataset)
    common["processing_class"] = tokenizer if tokenizer is not None else tiny_tokenizer()
    if kind in MIXTURES:
        args = MixtureGRPOConfig(**fields, **MIXTURES[kind])
        trainer = MixtureGRPOTrainer(**common, args=args)
        trainer.eos_token_ids = []  # the engine stops at no token
    else:
        args = GRPOConfig(**fields, generation_kwargs={"min_new_tokens": new_tokens})
        trainer = GRPOTrainer(**common, args=args)
    timer = StepTimer()
    trainer.add_callback(timer)
    return trainer, timer.times, time_generation(trainer)


def measure(benchmark, make_model, new_tokens: int, out: Path, rounds: int, tokenizer=None):
    """`rounds` times, train each trainer for 1 + STEPS steps (kinds alternating, so a load
    change hits all alike); the fastest step and generation after each warm-up."""
    times: dict[str, list[tuple[float, float]]] = {}
    info: dict[str, float] = {}

    def run() -> None:
        for kind in (*MIXTURES, "trl"):
            trainer, steps, generations = build(kind, make_model, new_tokens, out, tokenizer)
            trainer.train()
            times.setdefault(f"{kind}_step", []).extend(steps[1:])
            times.setdefault(f"{kind}_generation", []).extend(generations[1:])
            lengths = [h["completions/mean_length"] for h in trainer.state.log_history[:-1]]
            info[f"{kind}_mean_length"] = sum(lengths) / len(lengths)

    benchmark.pedantic(run, rounds=rounds, iterations=1)
    for name, pairs in times.items():
        info[f"{name}_s"] = min(wall for wall, _ in pairs)
        if not HAS_CUDA:  # one thread: CPU time is the work, whatever else runs
            info[f"{name}_cpu_s"] = min(cpu for _, cpu in pairs)
    timings = [
        key[len("trl_") : -len("_s")]
        for key in info
        if key.startswith("trl_") and key.endswith("_s")
    ]
    for kind in MIXTURES:
        for timing in timings:
            info[f"{kind}_{timing}_speedup"] = info[f"trl_{timing}_s"] / info[f"{kind}_{timing}_s"]
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3f}" for k, v in info.items()))
    return info


@pytest.fixture(scope="module")
def cpu_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda: tiny_qwen2(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    torch.set_num_threads(threads)


def random_qwen25_1p5b() -> Qwen2ForCausalLM:
    """The same random Qwen2.5-1.5B-shaped model on every call, fp32 on CUDA."""
    config = qwen25_1p5b_config()  # ids past the tiny tokenizer decode to ""
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Qwen2ForCausalLM(config)


def test_trl_step_cpu(benchmark, cpu_model, tmp_path):
    benchmark.group = "trl-step-cpu"
    info = measure(benchmark, cpu_model, 32, tmp_path, rounds=3)
    assert info["ours_mean_length"] == info["ours_k1_mean_length"] == info["trl_mean_length"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_trl_step_gpu(benchmark, tmp_path):
    benchmark.group = "trl-step-gpu"
    measure(benchmark, random_qwen25_1p5b, 256, tmp_path, rounds=2)
