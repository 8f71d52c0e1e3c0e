"""Rollout throughput: generated tokens per second (in `benchmark.extra_info`).

    pytest bench/bench_rollout.py -s -p no:cacheprovider

Four ways to roll out G trajectories per prompt:
  (a) `model.generate` discrete sampling (transformers' own loop, DynamicCache),
  (b) a naive eager MoT-G loop in the style of the paper's code: every group member
      prefilled separately, a DynamicCache grown by concatenation, eager step ops (softmax,
      top-k, renormalise, Dirichlet, gather, weighted sum) and per-row Python bookkeeping,
  (c) `RolloutEngine` discrete sampling (k = 1),
  (d) `RolloutEngine` MoT-G (k = 2, `dirichlet`).
The same random model and prompts feed all four; EOS is disabled so every row generates the
full length. The CPU suite uses a tiny random Qwen2 (G = 4, two short prompts, 32 new
tokens, one intra-op thread); the GPU suite (CUDA only) a Qwen2.5-1.5B-shaped random model
in bf16 (G = 10, one 256-token prompt, 512 new tokens).

Two more CPU cases isolate engine features: compaction of finished rows (a 4-layer,
hidden-512 model; 32 rows that stop by a forced EOS after 12, 22, 32 and 42 tokens;
`compact_fraction=None`, where finished rows ride along, vs the default 0.25) and prefill
sharing with long prompts (two 384-token prompts, G = 8, 16 new tokens;
`share_prefill=False`, one prefill row per trajectory as the baseline does, vs True).

tokens/s = generated tokens / fastest round. On the CPU the cases compared with each other
run round-robin inside one benchmark (`measure_interleaved`), so that load from other
processes on a shared machine hits each alike; per-case rates are in `extra_info`. On the
GPU each case is its own benchmark. With `-s` a table of rates and ratios is printed at
the end.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import pytest
import torch
from transformers import DynamicCache, Qwen2ForCausalLM

from motg_fast.kernels import MixtureSpec
from motg_fast.models import model_load_kwargs
from motg_fast.rollout.engine import RolloutEngine
from motg_fast.testing import (
    SteeredLM,
    qwen25_1p5b_config,
    tiny_qwen2,
    tiny_tokenizer,
)

HAS_CUDA = torch.cuda.is_available()
TEMPERATURE = 0.9
MIXTURE = MixtureSpec(k=2, selection="topk", weighting="dirichlet", temperature=TEMPERATURE)
DISCRETE = MixtureSpec(k=1, selection="sample", temperature=TEMPERATURE)
# The compiled decode does not take Dirichlet weights: MoT-G with sampled different tokens.
STATIC_MIXTURE = MixtureSpec(k=2, selection="sample", weighting="prob", temperature=TEMPERATURE)


# --------------------------------------------------------------------------------------
# The baseline: an eager per-step loop as the paper's code writes it
# --------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class NaiveRollout(NamedTuple):
    """What the eager loop generated: N = prompts × G rows, T steps, k slots."""

    tokens: int  # generated tokens (rows stop after EOS)
    ids: torch.Tensor  # [N,T,k] candidate ids of every step
    weights: torch.Tensor  # [N,T,k] mixture weights (one-hot after the thinking phase)
    token: torch.Tensor  # [N,T] representative tokens


@torch.no_grad()
def naive_mixture_rollout(
    model, prompts, group_size, max_new_tokens, *, k, temperature, think_end_ids, eos_id, pad
) -> NaiveRollout:
    """MoT-G rollout, eager, as the paper's code writes it."""
    device = model.device
    rows = [p for p in prompts for _ in range(group_size)]  # each member prefilled
    ids, mask = left_pad(rows, pad, device)
    positions = mask.sum(-1, keepdim=True)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=DynamicCache())
    cache, logits = out.past_key_values, out.logits[:, -1]
    embed = model.get_input_embeddings()
    n = len(rows)
    generated = [[] for _ in range(n)]
    running, mixing = [True] * n, [True] * n
    steps_ids, steps_weights, steps_token = [], [], []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        top_probs, top_ids = probs.topk(k, dim=-1)
        weights = top_probs / top_probs.sum(-1, keepdim=True)
        weights = torch.distributions.Dirichlet(weights).sample()
        mixed = (embed(top_ids) * weights.unsqueeze(-1).to(embed.weight.dtype)).sum(1, keepdim=True)
        mixed_token = top_ids.gather(1, torch.multinomial(weights, 1))
        plain_token = torch.multinomial(probs, 1)
        in_mixture = torch.tensor(mixing, device=device).unsqueeze(1)
        inputs = torch.where(in_mixture.unsqueeze(2), mixed, embed(plain_token))
        token = torch.where(in_mixture, mixed_token, plain_token)
        one_hot = torch.zeros_like(weights)
        one_hot[:, 0] = 1
        steps_ids.append(torch.where(in_mixture, top_ids, plain_token.expand(-1, k)))
        steps_weights.append(torch.where(in_mixture, weights, one_hot))
        steps_token.append(token[:, 0])
        for i in range(n):
            if not running[i]:
                continue
            generated[i].append(token[i].item())
            if mixing[i] and generated[i][-len(think_end_ids) :] == think_end_ids:
                mixing[i] = False
            if generated[i][-1] == eos_id:
                running[i] = False
        if not any(running):
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        out = model(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        positions = positions + 1
        cache, logits = out.past_key_values, out.logits[:, -1]
    return NaiveRollout(
        tokens=sum(len(g) for g in generated),
        ids=torch.stack(steps_ids, 1),
        weights=torch.stack(steps_weights, 1),
        token=torch.stack(steps_token, 1),
    )


# --------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------


class Setup:
    """Model, tokenizer, prompts and sizes of one suite."""

    def __init__(self, model, tokenizer, prompts, group_size, max_new_tokens):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.model.generation_config.eos_token_id = None  # full-length rows everywhere
        self.engine = RolloutEngine(
            model, tokenizer, max_new_tokens=max_new_tokens, eos_token_ids=[]
        )
        assert self.engine.matcher is not None  # the marker table, built outside the timings
        self.compiled = RolloutEngine(
            model, tokenizer, max_new_tokens=max_new_tokens, eos_token_ids=[], compile_decode=True
        )
        assert self.compiled.matcher is not None

    def sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    def hf_generate(self) -> int:
        rows = [p for p in self.prompts for _ in range(self.group_size)]
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, self.model.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=TEMPERATURE,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.sync()
        return (out.shape[1] - ids.shape[1]) * len(rows)

    def naive(self) -> int:
        tokens = naive_mixture_rollout(
            self.model,
            self.prompts,
            self.group_size,
            self.max_new_tokens,
            k=MIXTURE.k,
            temperature=TEMPERATURE,
            think_end_ids=self.tokenizer.encode("</think>"),
            eos_id=-1,
            pad=self.tokenizer.pad_token_id,
        ).tokens
        self.sync()
        return tokens

    def engine_run(self, spec: MixtureSpec, seed: int, compiled: bool = False) -> int:
        engine = self.compiled if compiled else self.engine
        rollout = engine.generate(self.prompts, spec, group_size=self.group_size, seed=seed)
        self.sync()
        return rollout.num_tokens

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


@pytest.fixture(scope="module")
def cpu_setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    prompts = [tokenizer.encode("the answer is <think>"), tokenizer.encode("a <think>")]
    yield Setup(model, tokenizer, prompts, group_size=4, max_new_tokens=32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpu_setup():
    device = torch.device("cuda")
    load = model_load_kwargs(device)
    config = qwen25_1p5b_config()
    config._attn_implementation = load["attn_implementation"]
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(load["dtype"]).eval()
    tokenizer = tiny_tokenizer()
    prompt = torch.randint(0, 250, (255,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt += tokenizer.encode("<think>")[-1:]
    return Setup(model, tokenizer, [prompt], group_size=10, max_new_tokens=512)


RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    yield
    for suite, rates in RESULTS.items():
        print(f"\n[{suite}] generated tokens/s")
        for name, rate in rates.items():
            print(f"  {name:<22} {rate:10.1f}")
        if {"hf_generate", "engine_discrete"} <= rates.keys():
            ratio = rates["engine_discrete"] / rates["hf_generate"]
            print(f"  engine discrete / generate     {ratio:.2f}x")
        if {"naive_mixture", "engine_mixture"} <= rates.keys():
            ratio = rates["engine_mixture"] / rates["naive_mixture"]
            print(f"  engine MoT-G / naive MoT-G     {ratio:.2f}x")


def measure(benchmark, suite: str, name: str, run, rounds: int) -> None:
    tokens = run()  # warm-up; every round generates the same number of tokens
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    rate = tokens / benchmark.stats.stats.min
    median_rate = tokens / benchmark.stats.stats.median
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=rate, tokens_per_s_median=median_rate)
    RESULTS.setdefault(suite, {})[name] = rate


def measure_interleaved(benchmark, suite: str, runs: dict, rounds: int) -> None:
    """Run `runs` round-robin `rounds` times (outside load then hits each alike) and record
    each one's rate from its fastest round."""
    best = dict.fromkeys(runs, math.inf)
    tokens = {}

    def sweep() -> None:
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)

    benchmark.pedantic(sweep, rounds=rounds, iterations=1, warmup_rounds=1)
    rates = {name: tokens[name] / best[name] for name in runs}
    benchmark.extra_info.update({f"{name}_tokens_per_s": rate for name, rate in rates.items()})
    RESULTS[suite] = rates


CASES = {
    "hf_generate": lambda s: s.hf_generate,
    "naive_mixture": lambda s: s.naive,
    "engine_discrete": lambda s: lambda: s.engine_run(DISCRETE, seed=0),
    "engine_mixture": lambda s: lambda: s.engine_run(MIXTURE, seed=0),
}


def test_rollout_cpu(benchmark, cpu_setup):
    benchmark.group = "rollout-cpu"
    runs = {name: make(cpu_setup) for name, make in CASES.items()}
    measure_interleaved(benchmark, "cpu", runs, rounds=9)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_rollout_gpu(benchmark, gpu_setup, name):
    benchmark.group = "rollout-gpu"
    measure(benchmark, "gpu", name, CASES[name](gpu_setup), rounds=2)


COMPILED_CASES = {
    "eager_discrete": lambda s: lambda: s.engine_run(DISCRETE, seed=0),
    "compiled_discrete": lambda s: lambda: s.engine_run(DISCRETE, seed=0, compiled=True),
    "eager_mixture": lambda s: lambda: s.engine_run(STATIC_MIXTURE, seed=0),
    "compiled_mixture": lambda s: lambda: s.engine_run(STATIC_MIXTURE, seed=0, compiled=True),
}


def test_compiled_decode_cpu(benchmark, cpu_setup):
    """Eager vs `compile_decode` (inductor, default mode on a CPU; no gain is expected)."""
    benchmark.group = "compiled-decode-cpu"
    runs = {name: make(cpu_setup) for name, make in COMPILED_CASES.items()}
    for run in runs.values():
        run()  # compilation outside the timings
    measure_interleaved(benchmark, "compiled-cpu", runs, rounds=5)


@pytest.fixture(scope="module")
def compiled_gpu_setup():
    """The Qwen2.5-1.5B shape, 8 prompts of 256 tokens, G = 10: 80 rows, 256 new tokens."""
    device = torch.device("cuda")
    load = model_load_kwargs(device)
    config = qwen25_1p5b_config()
    config._attn_implementation = "sdpa"  # the static cache's mask path
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(load["dtype"]).eval()
    tokenizer = tiny_tokenizer()
    rng = torch.Generator().manual_seed(0)
    think = tokenizer.encode("<think>")[-1:]
    prompts = [torch.randint(0, 250, (255,), generator=rng).tolist() + think for _ in range(8)]
    return Setup(model, tokenizer, prompts, group_size=10, max_new_tokens=256)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_decode_gpu(benchmark, compiled_gpu_setup, name):
    """Eager vs CUDA-graph decode; `extra_info` holds the step time and its weight-traffic
    bound (weight bytes / HBM bandwidth: every step reads every weight once)."""
    benchmark.group = "compiled-decode-gpu"
    setup = compiled_gpu_setup
    run = COMPILED_CASES[name](setup)
    run()  # compilation and CUDA-graph capture outside the timings
    measure(benchmark, "compiled-gpu", name, run, rounds=2)
    rows = len(setup.prompts) * setup.group_size
    step_s = rows / benchmark.extra_info["tokens_per_s"]
    bandwidth = hbm_bandwidth()
    bound = setup.weight_bytes() / bandwidth if bandwidth else float("nan")
    benchmark.extra_info.update(step_ms=step_s * 1e3, weight_bound_ms=bound * 1e3)
    print(f"\n{name}: step {step_s * 1e3:.2f} ms, weight-traffic bound {bound * 1e3:.2f} ms")


def hbm_bandwidth() -> float | None:
    """Peak memory bandwidth of the current GPU in bytes/s (None when torch does not say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate


@pytest.fixture(scope="module")
def staggered_setup():
    """32 rows (4 prompts x G=8) that stop by EOS after 42, 32, 22 and 12 tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    model = tiny_qwen2(hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    steered = SteeredLM(model, {44: eos}, suppressed=(eos,))
    think = tokenizer.encode("<think>")
    prompts = [[65] * n + think for n in (0, 10, 20, 30)]
    yield steered, tokenizer, prompts
    torch.set_num_threads(threads)


def test_compaction_cpu(benchmark, staggered_setup):
    benchmark.group = "compaction-cpu"
    model, tokenizer, prompts = staggered_setup

    def runner(fraction):
        engine = RolloutEngine(model, tokenizer, max_new_tokens=48, compact_fraction=fraction)
        return lambda: engine.generate(prompts, MIXTURE, group_size=8, seed=0).num_tokens

    runs = {"compact_fraction_None": runner(None), "compact_fraction_0.25": runner(0.25)}
    measure_interleaved(benchmark, "cpu-staggered-stops", runs, rounds=5)


@pytest.fixture(scope="module")
def long_prompt_setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=512
    )
    think = tokenizer.encode("<think>")
    prompts = [[65 + i] * (384 - len(think)) + think for i in range(2)]
    engine = RolloutEngine(model, tokenizer, max_new_tokens=16, eos_token_ids=[])
    yield engine, prompts
    torch.set_num_threads(threads)


def test_prefill_sharing_cpu(benchmark, long_prompt_setup):
    benchmark.group = "prefill-sharing-cpu"
    engine, prompts = long_prompt_setup

    def runner(share):
        return lambda: (
            engine.generate(prompts, MIXTURE, group_size=8, share_prefill=share, seed=0).num_tokens
        )

    runs = {"share_prefill_False": runner(False), "share_prefill_True": runner(True)}
    measure_interleaved(benchmark, "cpu-long-prompts", runs, rounds=3)
