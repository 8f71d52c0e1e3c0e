"""`mixture_logprobs` fused with the LM head (forward and backward) vs the reference: the
Triton path and the chunked torch-GEMM path.

On a CPU the Triton path runs in Triton's interpreter (tests/conftest.py sets
`TRITON_INTERPRET=1`) and the chunked path natively; on a GPU the same tests run on CUDA
tensors.
"""

import gc
import importlib

import pytest
import torch
import triton
import triton.language as tl

from motg_fast.kernels import mixture_embed, mixture_logprobs

logprobs_module = importlib.import_module("motg_fast.kernels.mixture_logprobs")
chunked_module = importlib.import_module("motg_fast.kernels.logprobs_chunked")
cast_module = importlib.import_module("motg_fast.kernels.weight_cast")
logprobs_kernels = importlib.import_module("motg_fast.kernels.logprobs_kernels")


pytestmark = pytest.mark.interpreter  # Triton's interpreter on a CPU: seconds each

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter truncates float32 → 16-bit casts (error up to 1 ulp where rounding
# gives 1/2): allow twice the reference's error there, 1.25 times on a GPU.
SLACK = 2.0 if DEVICE == "cpu" else 1.25
FP32_EPS = torch.finfo(torch.float32).eps
V, H = 301, 72  # not powers of two; H spans two full blocks and a partial one
TAU = 0.7
FAST_PATHS = ["triton", "chunked"]  # the paths that never materialise [N,V]


def make_inputs(lead, k, *, dtype=torch.float32, vocab=V, hidden=H, seed=0):
    """Hidden `lead + (hidden,)`, LM-head weight `[vocab,hidden]`, ids `lead + (k,)`."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.3
    ids = torch.randint(0, vocab, (*lead, k), generator=gen)
    ids.view(-1)[:2] = 5  # a repeated id
    return h.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), ids.to(DEVICE)


def upstream(outputs, seed=1):
    """Random upstream gradients, one per output (float32 like the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(out.shape, generator=gen).to(out.device) for out in outputs]


def run(hidden, weight, ids, grads=None, **kwargs):
    """`(outputs, dh, dW)` of one forward and backward; `grads` default to random."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    outputs = mixture_logprobs(hidden, weight, ids, temperature=TAU, **kwargs)
    grads = upstream(outputs) if grads is None else grads
    sum((out * g.to(out.dtype)).sum() for out, g in zip(outputs, grads, strict=True)).backward()
    return [out.detach() for out in outputs], hidden.grad, weight.grad


def max_err(result, gold):
    return (result.double() - gold.double()).abs().max().item()


def assert_no_worse(result, reference, gold):
    """Low-precision rule: the result is no further from the float64 gold than the reference
    is, times SLACK, plus a few float32 ulps of the largest gold value (float32 noise)."""
    allowed = SLACK * max_err(reference, gold) + 4 * FP32_EPS * gold.abs().max().item()
    assert max_err(result, gold) <= allowed, (max_err(result, gold), allowed)


def assert_all_close(triton_run, reference_run, *, tol=2e-5):
    (outs, dh, dw), (ref_outs, ref_dh, ref_dw) = triton_run, reference_run
    for out, ref in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dh, ref_dh, rtol=tol, atol=tol)
    torch.testing.assert_close(dw, ref_dw, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_fp32_forward_and_grads_match_reference(k, backend):
    h, w, ids = make_inputs((13,), k)
    result = run(h, w, ids, backend=backend)
    assert result[0][0].shape == (13, k) and result[0][1].shape == (13,)
    assert result[0][0].dtype == torch.float32
    assert_all_close(result, run(h, w, ids, backend="reference"))


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_entropy_and_leading_dims_match_reference(backend):
    h, w, ids = make_inputs((3, 5), 2)
    result = run(h, w, ids, backend=backend, return_entropy=True)
    assert [out.shape for out in result[0]] == [(3, 5, 2), (3, 5), (3, 5)]
    assert_all_close(result, run(h, w, ids, backend="reference", return_entropy=True))


def test_vocabulary_chunks_in_backward(monkeypatch):
    """A small chunk budget streams the backward over several chunks (the last partial)."""
    h, w, ids = make_inputs((20,), 2)
    monkeypatch.setattr(logprobs_module, "DLOGITS_BUDGET_BYTES", 20 * 4 * 64)
    assert logprobs_module.vocab_chunk(20, V, 4, 32) == 64  # 301 columns → 5 chunks
    result = run(h, w, ids, backend="triton", return_entropy=True)
    assert_all_close(result, run(h, w, ids, backend="reference", return_entropy=True))


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_reference(dtype, backend):
    h, w, ids = make_inputs((24,), 2, dtype=dtype)
    outs, dh, dw = run(h, w, ids, backend=backend, return_entropy=True)
    ref_outs, ref_dh, ref_dw = run(h, w, ids, backend="reference", return_entropy=True)
    gold_outs, gold_dh, gold_dw = run(h.double(), w.double(), ids, return_entropy=True)
    assert dh.dtype == dtype and dw.dtype == dtype
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert out.dtype == torch.float32
        assert_no_worse(out, ref, gold)
        if backend == "triton":
            assert max_err(out, gold) < 1e-4  # the fused path keeps the logits in float32
    assert_no_worse(dh, ref_dh, gold_dh)
    assert_no_worse(dw, ref_dw, gold_dw)


def test_autocast_casts_hidden_and_weight_like_the_lm_head(monkeypatch):
    """Under bf16 autocast float32 inputs run as bf16; their grads come back in float32."""
    h, w, ids = make_inputs((16,), 2)
    calls = count_triton_calls(monkeypatch)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        outs, dh, dw = run(h, w, ids, backend="triton")
    assert calls == [torch.bfloat16]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref_outs, ref_dh, ref_dw = run(h, w, ids, backend="reference")
    gold_outs, gold_dh, gold_dw = run(h.bfloat16().double(), w.bfloat16().double(), ids)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert_no_worse(out, ref, gold)
    assert_no_worse(dh, ref_dh, gold_dh)
    assert_no_worse(dw, ref_dw, gold_dw)


def tied_pipeline(
    embedding, mix, ids_in, weights_in, ids_out, grads, backend, *, tie=True, embed_backend=None
):
    """Embed mixtures with `E`, a tiny model, then log-probs with `E` as the LM head
    (`tie=False`: the embedding lookup uses a detached copy, only the LM head gets grads;
    `embed_backend` defaults to `backend`)."""
    embedding = embedding.detach().clone().requires_grad_()
    mix = mix.detach().clone().requires_grad_()
    lookup = embedding if tie else embedding.detach()
    inputs = mixture_embed(lookup, ids_in, weights_in, backend=embed_backend or backend)
    hidden = torch.tanh(inputs @ mix)
    logp, lse = mixture_logprobs(hidden, embedding, ids_out, temperature=TAU, backend=backend)
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    return embedding.grad, mix.grad


def tied_inputs():
    gen = torch.Generator().manual_seed(3)
    embedding = (torch.randn(V, H, generator=gen) * 0.3).to(DEVICE)
    mix = (torch.randn(H, H, generator=gen) / H**0.5).to(DEVICE)
    ids_in = torch.randint(0, V, (11, 2), generator=gen).to(DEVICE)
    weights_in = torch.rand(11, 2, generator=gen).to(DEVICE)
    ids_out = torch.randint(0, V, (11, 2), generator=gen).to(DEVICE)
    grads = [torch.randn(11, 2, generator=gen).to(DEVICE), torch.randn(11, generator=gen)]
    return (embedding, mix, ids_in, weights_in, ids_out, [g.to(DEVICE) for g in grads])


def test_tied_embedding_and_lm_head_sum_their_gradients():
    gen = torch.Generator().manual_seed(3)
    embedding = (torch.randn(V, H, generator=gen) * 0.3).to(DEVICE)
    mix = (torch.randn(H, H, generator=gen) / H**0.5).to(DEVICE)
    ids_in = torch.randint(0, V, (11, 2), generator=gen).to(DEVICE)
    weights_in = torch.rand(11, 2, generator=gen).to(DEVICE)
    ids_out = torch.randint(0, V, (11, 2), generator=gen).to(DEVICE)
    grads = [torch.randn(11, 2, generator=gen).to(DEVICE), torch.randn(11, generator=gen)]
    args = (embedding, mix, ids_in, weights_in, ids_out, [g.to(DEVICE) for g in grads])
    d_emb, d_mix = tied_pipeline(*args, backend="triton")
    ref_emb, ref_mix = tied_pipeline(*args, backend="reference")
    torch.testing.assert_close(d_emb, ref_emb, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(d_mix, ref_mix, rtol=2e-5, atol=2e-5)
    lm_head_only, _ = tied_pipeline(*args, backend="triton", tie=False)
    assert (d_emb - lm_head_only).abs().max() > 1e-3  # the embedding use contributes too


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_gradient_only_where_required_and_deterministic(backend):
    """Frozen LM head or frozen hidden; two runs give bit-identical results (no atomics)."""
    h, w, ids = make_inputs((9,), 2)
    (ref_logp, ref_lse), ref_dh, ref_dw = run(h, w, ids, backend="reference")
    grads = upstream((ref_logp, ref_lse))
    hidden = h.clone().requires_grad_()
    logp, lse = mixture_logprobs(hidden, w, ids, temperature=TAU, backend=backend)
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=2e-5, atol=2e-5)
    weight = w.clone().requires_grad_()
    logp, lse = mixture_logprobs(h, weight, ids, temperature=TAU, backend=backend)
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    torch.testing.assert_close(weight.grad, ref_dw, rtol=2e-5, atol=2e-5)
    first = run(h, w, ids, grads, backend=backend)
    second = run(h, w, ids, grads, backend=backend)
    for a, b in zip([*first[0], *first[1:]], [*second[0], *second[1:]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_int32_ids_strided_hidden_and_empty_batch(backend):
    h, w, ids = make_inputs((6,), 2)
    wide = torch.zeros(6, 2 * H, device=DEVICE)
    wide[:, :H] = h
    logp, lse = mixture_logprobs(wide[:, :H], w, ids.int(), temperature=TAU, backend=backend)
    ref_logp, ref_lse = mixture_logprobs(h, w, ids, temperature=TAU, backend="reference")
    torch.testing.assert_close(logp, ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    empty = torch.zeros(0, H, device=DEVICE, requires_grad=True)
    weight = w.clone().requires_grad_()
    no_ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    logp, lse = mixture_logprobs(empty, weight, no_ids, backend=backend)
    (logp.sum() + lse.sum()).backward()
    assert logp.shape == (0, 2) and empty.grad.shape == (0, H) and (weight.grad == 0).all()


def count_triton_calls(monkeypatch):
    calls = []
    original = logprobs_module.launch_logprobs_forward

    def spy(hidden, *args):
        calls.append(hidden.dtype)
        return original(hidden, *args)

    monkeypatch.setattr(logprobs_module, "launch_logprobs_forward", spy)
    return calls


def test_float64_runs_the_reference_and_errors_stay_clear(monkeypatch):
    calls = count_triton_calls(monkeypatch)
    h, w, ids = make_inputs((4,), 2, dtype=torch.float64)
    logp, lse, ent = mixture_logprobs(h, w, ids, backend="triton", return_entropy=True)
    assert not calls and logp.dtype == torch.float64 and ent.shape == (4,)
    with pytest.raises(TypeError, match="share one dtype"):
        mixture_logprobs(h.float(), w.bfloat16(), ids, backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        mixture_logprobs(h.float(), w.float(), ids, temperature=0.0, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2048, 8192])
def test_gpu_real_shapes_and_memory(n):
    """Qwen2.5-1.5B LM head (V = 151936, H = 1536), k = 2, bf16, against an fp32 gold; the
    fused path never holds anything near `[N,V]`."""
    vocab, hidden = 151936, 1536
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    ids = torch.randint(0, vocab, (n, 2), device="cuda", generator=gen)
    grads = [torch.randn(n, 2, device="cuda", generator=gen), torch.randn(n, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs, dh, dw = run(h, w, ids, grads, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * (dh.nbytes + dw.nbytes)  # I/O
    limit = logprobs_module.DLOGITS_BUDGET_BYTES + 4 * n * hidden * 4 + 2**26
    assert limit < n * vocab * 2  # below one bf16 copy of the logits
    assert extra < limit, f"fused path used {extra / 2**20:.0f} MiB beyond inputs/outputs"
    ref_outs, ref_dh, ref_dw = run(h, w, ids, grads, backend="reference")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gold_outs, gold_dh, gold_dw = run(h.float(), w.float(), ids, grads, backend="reference")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert_no_worse(out, ref, gold)
    assert_no_worse(dh, ref_dh, gold_dh)
    assert_no_worse(dw, ref_dw, gold_dw)


# ---------------------------------------------------------------------------------------
# The chunked path (torch GEMMs): chunking, tied heads, dispatch
# ---------------------------------------------------------------------------------------


def test_chunked_path_with_tied_embedding():
    args = tied_inputs()
    d_emb, d_mix = tied_pipeline(*args, backend="chunked", embed_backend="triton")
    ref_emb, ref_mix = tied_pipeline(*args, backend="reference")
    torch.testing.assert_close(d_emb, ref_emb, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(d_mix, ref_mix, rtol=2e-5, atol=2e-5)


def test_chunked_path_never_holds_more_than_one_chunk(monkeypatch):
    """A small budget: the forward takes 3 rows at a time (20 rows → 7 chunks, the last
    partial), the backward 45 columns (301 → 7 chunks, the last partial); no logits block
    beyond one chunk exists, and the results are the reference's."""
    h, w, ids = make_inputs((20,), 3)
    ids[:, 0] = torch.arange(20) * 15  # ids in every backward chunk, incl. the last columns
    ids[-1, 1] = V - 1
    monkeypatch.setattr(chunked_module, "CHUNK_BUDGET_BYTES", 3620)
    assert chunked_module.row_chunk(20, V) == 3
    assert chunked_module.column_chunk(20, V) == 45
    shapes = []
    original = chunked_module.chunk_logits

    def spy(hidden, weight, temperature):
        shapes.append((hidden.shape[0], weight.shape[0]))
        return original(hidden, weight, temperature)

    monkeypatch.setattr(chunked_module, "chunk_logits", spy)
    result = run(h, w, ids, backend="chunked", return_entropy=True)
    forward, backward = shapes[:7], shapes[7:]
    assert forward == [(3, V)] * 6 + [(2, V)]
    assert backward == [(20, 45)] * 6 + [(20, 31)]
    assert_all_close(result, run(h, w, ids, backend="reference", return_entropy=True))


def test_chunked_path_under_autocast():
    """Under bf16 autocast float32 inputs run as bf16 through the chunked GEMMs; grads float32."""
    h, w, ids = make_inputs((16,), 2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        outs, dh, dw = run(h, w, ids, backend="chunked")
        ref_outs, ref_dh, ref_dw = run(h, w, ids, backend="reference")
    gold_outs, gold_dh, gold_dw = run(h.bfloat16().double(), w.bfloat16().double(), ids)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert_no_worse(out, ref, gold)
    assert_no_worse(dh, ref_dh, gold_dh)
    assert_no_worse(dw, ref_dw, gold_dw)


def test_chunked_dispatch_and_errors(monkeypatch):
    """`backend="chunked"` runs the chunked path (an explicit backend beats MOTG_BACKEND),
    never the Triton kernels; float64 runs the reference; unknown names list all three."""
    monkeypatch.setenv("MOTG_BACKEND", "triton")
    triton_calls = count_triton_calls(monkeypatch)
    chunked_calls = []
    original = chunked_module.chunked_forward

    def spy(hidden, *args):
        chunked_calls.append(hidden.dtype)
        return original(hidden, *args)

    monkeypatch.setattr(chunked_module, "chunked_forward", spy)
    h, w, ids = make_inputs((4,), 2)
    logp, lse = mixture_logprobs(h, w, ids, temperature=TAU, backend="chunked")
    assert chunked_calls == [torch.float32] and not triton_calls
    ref_logp, ref_lse = logprobs_module.mixture_logprobs_ref(h, w, ids, TAU)
    torch.testing.assert_close(logp, ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    out = mixture_logprobs(h.double(), w.double(), ids, backend="chunked")
    assert out[0].dtype == torch.float64 and chunked_calls == [torch.float32]
    with pytest.raises(ValueError, match="chunked"):
        mixture_logprobs(h, w, ids, backend="cublas")
    with pytest.raises(TypeError, match="share one dtype"):
        mixture_logprobs(h, w.bfloat16(), ids, backend="chunked")


# ---------------------------------------------------------------------------------------
# The logits at the ids and the logsumexp come from the same numbers (TF32 consistency)
# ---------------------------------------------------------------------------------------

_exact_tile = logprobs_kernels.logits_tile


@triton.jit
def _coarse_tile(
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    H,
    offs_n,
    n_mask,
    offs_v,
    v_mask,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The logits tile at a precision coarser than float32 (bf16-rounded, as a stand-in for
    TF32 dots, which Triton's interpreter does not emulate)."""
    acc = _exact_tile(
        h_ptr, stride_h, w_ptr, stride_w, H, offs_n, n_mask, offs_v, v_mask,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
    )  # fmt: skip
    return acc.to(tl.bfloat16).to(tl.float32)


def dominant_inputs(n=8, *, device=DEVICE, scale=60.3):
    """Rows whose first id has a logit ≈ `scale`, far above the rest: its log-prob is 0 to
    float32 precision, whatever the rounding of the logits, iff the logit at the id and the
    logsumexp are the same number."""
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(n, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.05
    ids = torch.stack([torch.arange(n) * 7 + 3, torch.arange(n) * 7 + 4], dim=-1)
    w[ids[:, 0]] = h * (scale / (h * h).sum(-1, keepdim=True))
    return h.to(device), w.to(device), ids.to(device)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter only: compiled kernels keep their tile")
def test_logits_at_ids_come_from_the_logsumexp_tiles(monkeypatch):
    """With the tiles at a coarser precision than an exact float32 dot, the log-prob of a
    dominant token stays 0 (never > 0): the logits at the ids are read from the same tiles
    as the logsumexp, not recomputed at another precision (on CUDA,
    `test_gpu_tf32_logits_at_ids_agree_with_the_logsumexp` checks real TF32 dots)."""
    monkeypatch.setattr(logprobs_kernels, "logits_tile", _coarse_tile)
    h, w, ids = dominant_inputs()
    logp, lse = mixture_logprobs(h, w, ids, temperature=1.0, backend="triton")
    assert (logp <= 0).all()
    torch.testing.assert_close(logp[:, 0], torch.zeros_like(lse), rtol=0, atol=1e-6)
    rounded = (h @ w.t()).bfloat16().float()  # the coarse tile's logits, up to summation order
    torch.testing.assert_close(lse, rounded.logsumexp(-1), rtol=0, atol=0.5)


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_chunked_and_triton_logprobs_of_a_dominant_token_are_zero(backend):
    h, w, ids = dominant_inputs()
    logp, _ = mixture_logprobs(h, w, ids, temperature=1.0, backend=backend)
    assert (logp <= 0).all()
    torch.testing.assert_close(logp[:, 0], torch.zeros(len(h), device=DEVICE), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Autocast: one cast of the LM head per weight version
# ---------------------------------------------------------------------------------------


class CastCounter:
    """The cached casts of LM heads made since it was created (`len`)."""

    def __init__(self) -> None:
        self.start = cast_module.weight_casts_made()

    def __len__(self) -> int:
        return cast_module.weight_casts_made() - self.start


@pytest.fixture
def cast_counter():
    """Counts the casts of an LM head to the autocast dtype; starts from an empty cache."""
    logprobs_module.clear_weight_cast_cache()
    yield CastCounter()
    logprobs_module.clear_weight_cast_cache()


def autocast_step(h, weight, ids, grads, backend):
    """A no-grad scoring pass and two micro-batches with backward, under bf16 autocast (the
    shape of one GRPO step); returns the second micro-batch's outputs."""
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixture_logprobs(h, weight, ids, temperature=TAU, backend=backend)
    for rows in (slice(0, 7), slice(7, None)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logp, lse = mixture_logprobs(
                h[rows], weight, ids[rows], temperature=TAU, backend=backend
            )
        ((logp * grads[0][rows]).sum() + (lse * grads[1][rows]).sum()).backward()
    return logp.detach(), lse.detach()


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("fused", [False, True])
def test_autocast_casts_the_lm_head_once_per_step(cast_counter, monkeypatch, backend, fused):
    """Three calls between two optimizer steps cast the float32 weight once, give the same
    outputs and gradients as casting every call, and save that one copy for backward; the
    optimizer step (fused AdamW too, which updates in place without a version bump) drops the
    copy, so the next step casts the new weight."""
    h, w, ids = make_inputs((12,), 2)
    grads = upstream((torch.empty(12, 2), torch.empty(12)))
    weight = w.clone().requires_grad_()
    saved = []

    def pack(tensor):
        if tensor.shape == weight.shape:
            saved.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        first = autocast_step(h, weight, ids, grads, backend)
    cached = cast_module.cached_cast(weight)
    assert len(cast_counter) == 1 and cached.shape == (V, H) and cached.dtype == torch.bfloat16
    assert len(saved) == 2 and set(saved) == {cached.data_ptr()}  # no per-call copy saved

    monkeypatch.setattr(cast_module, "CACHE_WEIGHT_CASTS", False)
    uncached = w.clone().requires_grad_()
    expected = autocast_step(h, uncached, ids, grads, backend)
    assert len(cast_counter) == 1  # uncached casts do not go through the cache
    monkeypatch.setattr(cast_module, "CACHE_WEIGHT_CASTS", True)
    for a, b in zip([*first, weight.grad], [*expected, uncached.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    optimizer = torch.optim.AdamW([weight], lr=0.05, fused=fused)
    optimizer.step()
    assert cast_module.cached_cast_count() == 0
    weight.grad = None
    second = autocast_step(h, weight, ids, grads, backend)
    assert len(cast_counter) == 2
    fresh = weight.detach().clone().requires_grad_()
    monkeypatch.setattr(cast_module, "CACHE_WEIGHT_CASTS", False)
    again = autocast_step(h, fresh, ids, grads, backend)
    for a, b in zip([*second, weight.grad], [*again, fresh.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weight_cast_cache_follows_in_place_changes_and_frees(cast_counter):
    """An in-place change outside an optimizer (a version bump) recasts; a frozen weight is
    never cached; the entry goes away with its weight."""
    h, w, ids = make_inputs((4,), 2)
    weight = w.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        first, _ = mixture_logprobs(h, weight, ids, backend="chunked")
        with torch.no_grad():
            weight.mul_(2.0)
        second, _ = mixture_logprobs(h, weight, ids, backend="chunked")
        mixture_logprobs(h, w, ids, backend="chunked")  # requires no grad: not cached
        mixture_logprobs(h, w, ids, backend="chunked")
    assert len(cast_counter) == 2 and not torch.equal(first, second)
    ref, _ = mixture_logprobs(h, weight.detach(), ids, backend="chunked")  # float32, no cast
    torch.testing.assert_close(second, ref, rtol=0.05, atol=0.05)
    assert cast_module.cached_cast_count() == 1 and cast_module.cached_cast(weight) is not None
    del weight, first, second  # the outputs' graphs hold the weight too
    gc.collect()
    assert cast_module.cached_cast_count() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST_PATHS)
def test_gpu_tf32_logits_at_ids_agree_with_the_logsumexp(backend):
    """float32 inputs with TF32 matmuls on: the dominant token's log-prob is 0 (the logits at
    the ids and the logsumexp are the same TF32 numbers, never a TF32 logsumexp against an
    IEEE logit), and the other log-probs are within TF32 error of a float64 gold."""
    h, w, ids = dominant_inputs(32, device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        logp, lse = mixture_logprobs(h, w, ids, temperature=1.0, backend=backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (logp <= 0).all()
    torch.testing.assert_close(logp[:, 0], torch.zeros_like(lse), rtol=0, atol=1e-6)
    gold_logp, gold_lse = mixture_logprobs(h.double(), w.double(), ids, temperature=1.0)
    torch.testing.assert_close(logp.double(), gold_logp, rtol=0, atol=0.1)  # 60 · 2^-11 ≈ 0.03
    torch.testing.assert_close(lse.double(), gold_lse, rtol=0, atol=0.1)


@pytest.mark.gpu
def test_gpu_chunked_real_shapes_and_memory():
    """The chunked path at the Qwen2.5-1.5B LM head (N = 8192, k = 2, bf16) against an fp32
    gold; it holds a few chunk blocks, far below one float32 copy of the `[N,V]` logits."""
    n, vocab, hidden = 8192, 151936, 1536
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    ids = torch.randint(0, vocab, (n, 2), device="cuda", generator=gen)
    grads = [torch.randn(n, 2, device="cuda", generator=gen), torch.randn(n, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs, dh, dw = run(h, w, ids, grads, backend="chunked")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * (dh.nbytes + dw.nbytes)  # I/O
    limit = 4 * chunked_module.CHUNK_BUDGET_BYTES + 4 * n * hidden * 4 + 2**26
    assert limit < n * vocab * 4  # below one float32 copy of the logits
    assert extra < limit, f"chunked path used {extra / 2**20:.0f} MiB beyond inputs/outputs"
    ref_outs, ref_dh, ref_dw = run(h, w, ids, grads, backend="reference")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gold_outs, gold_dh, gold_dw = run(h.float(), w.float(), ids, grads, backend="reference")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert_no_worse(out, ref, gold)
    assert_no_worse(dh, ref_dh, gold_dh)
    assert_no_worse(dw, ref_dw, gold_dw)


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_inference_mode_calls_do_not_fill_the_cast_cache(cast_counter, backend):
    """A copy made under `torch.inference_mode` could never be saved for backward: such calls
    cast without caching, and the training call after them works."""
    h, w, ids = make_inputs((4,), 2)
    weight = w.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with torch.inference_mode():
            mixture_logprobs(h, weight, ids, backend=backend)
        assert cast_module.cached_cast_count() == 0 and len(cast_counter) == 0
        logp, lse = mixture_logprobs(h, weight, ids, backend=backend)
    (logp.sum() + lse.sum()).backward()
    cached = cast_module.cached_cast(weight)
    assert len(cast_counter) == 1 and cached.dtype == torch.bfloat16
    assert weight.grad.dtype == torch.float32
