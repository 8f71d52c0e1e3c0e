"""Rollout step: the fused Triton kernel vs the eager reference vs torch.compile of it.

    pytest bench/bench_mixture_step.py --benchmark-only

CUDA: Qwen2.5-1.5B shapes (V = 151936, H = 1536), bf16 logits and embedding, k ∈ {2, 8},
decode batches B ∈ {1, 8, 64, 256}, modes `topk`+`prob` and `sample`+`gumbel`;
implementations `triton` (the fused kernels, split heuristic on), `eager` (`mixture_step_ref`)
and `compiled` (`torch.compile` of the same reference). CPU: one small shape; `triton` runs
only when Triton's interpreter is on (it times the interpreter, not a kernel: a smoke test).

Every implementation draws its noise from the device's default generator. Each timed call
synchronises the device; a warm-up call compiles outside the timing. `benchmark.extra_info`
records `gbps`: the bytes any implementation must move (the logits read once, k embedding
rows read per row, the outputs written once) / time.
"""

from __future__ import annotations

import functools

import pytest
import torch

from motg_fast.kernels import (
    HAS_TRITON,
    MixtureSpec,
    mixture_step,
    mixture_step_ref,
    triton_interpreter_on,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODES = [("topk", "prob"), ("sample", "gumbel")]
if CUDA:
    VOCAB, HIDDEN, DTYPE, ROUNDS = 151936, 1536, torch.bfloat16, 20
    BATCHES, KS = [1, 8, 64, 256], [2, 8]
    IMPLS = ["triton", "eager", "compiled"]
else:
    VOCAB, HIDDEN, DTYPE, ROUNDS = 2048, 128, torch.float32, 3
    BATCHES, KS = [4], [2]
    IMPLS = ["eager", "compiled"] + (["triton"] if HAS_TRITON and triton_interpreter_on() else [])


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.cache
def step_fn(impl: str, selection: str, weighting: str, k: int):
    """`(logits [B,V], embedding [V,H]) → MixtureStep` for one implementation and mode."""
    spec = MixtureSpec(k=k, temperature=0.9, selection=selection, weighting=weighting)
    if impl == "triton":
        return lambda logits, emb: mixture_step(logits, emb, spec, backend="triton", validate=False)
    reference = lambda logits, emb: mixture_step_ref(logits, emb, spec)
    return torch.compile(reference, dynamic=False) if impl == "compiled" else reference


def step_bytes(batch: int, k: int) -> int:
    """Compulsory traffic of one step: logits in, k embedding rows per row, outputs out."""
    element = torch.tensor([], dtype=DTYPE).element_size()
    logits = batch * VOCAB * element
    rows = batch * k * HIDDEN * element
    # ids int64, weights f32, mask bool, logprobs f32 per slot; token, lse, entropy; embeds
    outputs = batch * (k * (8 + 4 + 1 + 4) + 8 + 4 + 4 + HIDDEN * element)
    return logits + rows + outputs


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "+".join(m))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mixture_step(benchmark, impl, batch, k, mode):
    selection, weighting = mode
    benchmark.group = f"mixture_step {selection}+{weighting} B={batch} k={k}"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(batch, VOCAB, device=DEVICE, generator=gen) * 2).to(DTYPE)
    embedding = (torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=gen) * 0.02).to(DTYPE)
    fn = step_fn(impl, selection, weighting, k)

    def step():
        out = fn(logits, embedding)
        sync()
        return out

    try:
        step()  # warm-up: Triton JIT / torch.compile stay out of the timing
    except Exception as exc:
        if impl != "compiled":
            raise
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        impl=impl, B=batch, V=VOCAB, H=HIDDEN, k=k, mode=f"{selection}+{weighting}",
        device=DEVICE, dtype=str(DTYPE),
    )  # fmt: skip
    benchmark.extra_info["gbps"] = float(f"{step_bytes(batch, k) / seconds / 1e9:.4g}")
