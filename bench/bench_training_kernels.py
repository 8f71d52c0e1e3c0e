"""Training kernels, forward + backward: fused Triton vs chunked torch GEMMs vs the eager
reference vs torch.compile.

    pytest bench/bench_training_kernels.py --benchmark-only
    MOTG_BENCH_ROUNDS=3 pytest bench/bench_training_kernels.py --benchmark-only -k "8192"

CUDA: Qwen2.5-1.5B shapes (V = 151936, H = 1536), N ∈ {2048, 8192, 16384} positions, k = 2,
bf16; implementations `triton` (the fused kernels; `triton_det` is `mixture_embed`'s
deterministic mode), `chunked` (`mixture_logprobs(backend="chunked")`: the same math with the
GEMMs in cuBLAS, in chunks that never hold `[N,V]`), `eager` (the `*_ref` twins, which
materialise `[N,V]` logits) and `compiled` (`torch.compile` of the same reference). CPU:
small shapes; eager, compiled and chunked (plain torch) only (the Triton interpreter measures
nothing useful). Parametrisation ids are `[impl-N]`, so `-k` selects implementations and
sizes; `MOTG_BENCH_ROUNDS` overrides the timed rounds (default 10 on CUDA, 20 on CPU).

Each timed call runs forward and backward and synchronises the device; a warm-up call first
compiles/autotunes outside the timing. `benchmark.extra_info` records:
- `peak_extra_mib`: CUDA peak memory of one call beyond the inputs and the returned
  outputs/gradients (`max_memory_allocated` minus the baseline minus their bytes);
- `gbps`: compulsory bytes (inputs read, outputs and gradients written once each) / time;
- `tflops` (log-probs): the three `2·N·V·H` matmuls any implementation needs / time.
"""

from __future__ import annotations

import os

import pytest
import torch

from motg_fast.kernels import (
    mixture_embed,
    mixture_embed_ref,
    mixture_logprobs,
    mixture_logprobs_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
K = 2
if CUDA:
    VOCAB, HIDDEN, DTYPE, ROUNDS = 151936, 1536, torch.bfloat16, 10
    POSITIONS = [2048, 8192, 16384]
    LOGPROB_IMPLS = ["triton", "chunked", "eager", "compiled"]
    EMBED_IMPLS = ["triton", "triton_det", "eager", "compiled"]
else:
    VOCAB, HIDDEN, DTYPE, ROUNDS = 4096, 256, torch.float32, 20
    POSITIONS = [64, 256]
    LOGPROB_IMPLS = ["eager", "compiled", "chunked"]
    EMBED_IMPLS = ["eager", "compiled"]
ROUNDS = int(os.environ.get("MOTG_BENCH_ROUNDS", ROUNDS))


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def compiled(fn):
    """`torch.compile(fn)`, or a skip when this machine cannot compile."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"torch.compile unavailable: {exc}")


def logprobs_fn(impl: str):
    """`(hidden [N,H], weight [V,H], ids [N,k]) → (logprobs, lse)` for one implementation."""
    if impl in ("triton", "chunked"):
        return lambda h, w, ids: mixture_logprobs(h, w, ids, temperature=0.9, backend=impl)
    reference = lambda h, w, ids: mixture_logprobs_ref(h, w, ids, 0.9)
    return compiled(reference) if impl == "compiled" else reference


def embed_fn(impl: str):
    """`(embedding [V,H], ids [N,k], weights [N,k]) → [N,H]` for one implementation."""
    if impl.startswith("triton"):
        det = impl == "triton_det"
        return lambda e, ids, w: mixture_embed(e, ids, w, backend="triton", deterministic=det)
    return compiled(mixture_embed_ref) if impl == "compiled" else mixture_embed_ref


def train_step(fn, inputs, differentiable, grad_outputs):
    """One timed call: forward, backward into `differentiable`, device sync."""

    def step():
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = torch.autograd.grad(outputs, differentiable, grad_outputs)
        sync()
        return (*outputs, *grads)

    return step


def peak_extra_mib(step) -> float | None:
    """CUDA peak memory of one call beyond its inputs and what it returns (None on CPU)."""
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    results = step()
    extra = torch.cuda.max_memory_allocated() - base - sum(t.nbytes for t in results)
    return round(extra / 2**20, 1)


def measure(benchmark, step, *, nbytes: int, flops: int | None, **info) -> None:
    try:
        step()  # warm-up: compilation and autotuning stay out of the timing
    except Exception as exc:
        if info.get("impl") != "compiled":
            raise
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
    peak = peak_extra_mib(step)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(info, device=DEVICE, dtype=str(DTYPE), peak_extra_mib=peak)
    benchmark.extra_info["gbps"] = round(nbytes / seconds / 1e9, 2)
    if flops is not None:
        benchmark.extra_info["tflops"] = round(flops / seconds / 1e12, 2)


def make_logprobs_inputs(n: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, HIDDEN, device=DEVICE, generator=gen).to(DTYPE)
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=gen) * 0.02).to(DTYPE)
    ids = torch.randint(0, VOCAB, (n, K), device=DEVICE, generator=gen)
    grads = (torch.randn(n, K, device=DEVICE, generator=gen), torch.zeros(n, device=DEVICE))
    return hidden.requires_grad_(), weight.requires_grad_(), ids, grads


@pytest.mark.parametrize("n", POSITIONS)
@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_mixture_logprobs_fwd_bwd(benchmark, impl, n):
    benchmark.group = f"mixture_logprobs fwd+bwd N={n}"
    hidden, weight, ids, grads = make_logprobs_inputs(n)
    step = train_step(logprobs_fn(impl), (hidden, weight, ids), (hidden, weight), grads)
    element = hidden.element_size()
    nbytes = 2 * (n * HIDDEN + VOCAB * HIDDEN) * element  # read h, W; write dh, dW
    measure(
        benchmark, step, nbytes=nbytes, flops=3 * 2 * n * VOCAB * HIDDEN,
        impl=impl, N=n, V=VOCAB, H=HIDDEN, k=K,
    )  # fmt: skip


def make_embed_inputs(n: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    embedding = torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=gen).to(DTYPE)
    ids = torch.randint(0, VOCAB, (n, K), device=DEVICE, generator=gen)
    weights = torch.rand(n, K, device=DEVICE, generator=gen)
    grad = torch.randn(n, HIDDEN, device=DEVICE, generator=gen).to(DTYPE)
    return embedding.requires_grad_(), ids, weights, grad


@pytest.mark.parametrize("n", POSITIONS)
@pytest.mark.parametrize("impl", EMBED_IMPLS)
def test_mixture_embed_fwd_bwd(benchmark, impl, n):
    benchmark.group = f"mixture_embed fwd+bwd N={n}"
    embedding, ids, weights, grad = make_embed_inputs(n)
    step = train_step(embed_fn(impl), (embedding, ids, weights), (embedding,), (grad,))
    element = embedding.element_size()
    # forward reads k rows and writes one per position; backward reads de, writes dE once
    nbytes = (n * K * HIDDEN + 2 * n * HIDDEN + VOCAB * HIDDEN) * element
    measure(benchmark, step, nbytes=nbytes, flops=None, impl=impl, N=n, V=VOCAB, H=HIDDEN, k=K)


# One micro-batch of the default job's LM head: SmolLM2-135M, float32 on a CPU.
HEAD_N, HEAD_V, HEAD_H, HEAD_K = 264, 49152, 576, 3


@pytest.mark.skipif(CUDA, reason="the CPU default of mixture_logprobs (CUDA times Triton above)")
@pytest.mark.parametrize("rest", [False, True], ids=["plain", "rest"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_default_model_head_cpu(benchmark, impl, rest):
    """`mixture_logprobs` forward + backward at the default job's shape (N = 264 positions,
    V = 49152, H = 576, k = 3): the reference, which holds `[N,V]` logits, against the
    chunked path, the default off CUDA, which does not; `rest` adds the log-mass outside
    the ids (the exact likelihood of `sample`)."""
    benchmark.group = f"default model's LM head, CPU ({'rest' if rest else 'plain'})"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(HEAD_N, HEAD_H, generator=gen).requires_grad_()
    weight = (torch.randn(HEAD_V, HEAD_H, generator=gen) * 0.02).requires_grad_()
    ids = torch.randint(0, HEAD_V, (HEAD_N, HEAD_K), generator=gen)
    grads = (torch.randn(HEAD_N, HEAD_K, generator=gen), torch.zeros(HEAD_N))
    grads += (torch.randn(HEAD_N, generator=gen),) if rest else ()

    def head(h, w, i):
        return mixture_logprobs(h, w, i, temperature=0.9, backend=impl, return_rest=rest)

    step = train_step(head, (hidden, weight, ids), (hidden, weight), grads)
    step()
    benchmark.pedantic(step, rounds=min(ROUNDS, 5), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(impl=impl, rest=rest, N=HEAD_N, V=HEAD_V, H=HEAD_H, k=HEAD_K)
