"""Triton `mixture_logprobs` fused with the LM head (forward and backward) vs the reference.

On a CPU the Triton path runs in Triton's interpreter (tests/conftest.py sets
`TRITON_INTERPRET=1`); on a GPU the same tests run on CUDA tensors.
"""

import importlib

import pytest
import torch

from motg_fast.kernels import mixture_embed, mixture_logprobs

logprobs_module = importlib.import_module("motg_fast.kernels.mixture_logprobs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter truncates float32 → 16-bit casts (error up to 1 ulp where rounding
# gives 1/2): allow twice the reference's error there, 1.25 times on a GPU.
SLACK = 2.0 if DEVICE == "cpu" else 1.25
FP32_EPS = torch.finfo(torch.float32).eps
V, H = 301, 72  # not powers of two; H spans two full blocks and a partial one
TAU = 0.7


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


@pytest.mark.parametrize("k", [1, 2, 5])
def test_fp32_forward_and_grads_match_reference(k):
    h, w, ids = make_inputs((13,), k)
    result = run(h, w, ids, backend="triton")
    assert result[0][0].shape == (13, k) and result[0][1].shape == (13,)
    assert result[0][0].dtype == torch.float32
    assert_all_close(result, run(h, w, ids, backend="reference"))


def test_entropy_and_leading_dims_match_reference():
    h, w, ids = make_inputs((3, 5), 2)
    result = run(h, w, ids, backend="triton", return_entropy=True)
    assert [out.shape for out in result[0]] == [(3, 5, 2), (3, 5), (3, 5)]
    assert_all_close(result, run(h, w, ids, backend="reference", return_entropy=True))


def test_vocabulary_chunks_in_backward(monkeypatch):
    """A small chunk budget streams the backward over several chunks (the last partial)."""
    h, w, ids = make_inputs((20,), 2)
    monkeypatch.setattr(logprobs_module, "DLOGITS_BUDGET_BYTES", 20 * 4 * 64)
    assert logprobs_module._vocab_chunk(20, V, 4, 32) == 64  # 301 columns → 5 chunks
    result = run(h, w, ids, backend="triton", return_entropy=True)
    assert_all_close(result, run(h, w, ids, backend="reference", return_entropy=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_reference(dtype):
    h, w, ids = make_inputs((24,), 2, dtype=dtype)
    outs, dh, dw = run(h, w, ids, backend="triton", return_entropy=True)
    ref_outs, ref_dh, ref_dw = run(h, w, ids, backend="reference", return_entropy=True)
    gold_outs, gold_dh, gold_dw = run(h.double(), w.double(), ids, return_entropy=True)
    assert dh.dtype == dtype and dw.dtype == dtype
    for out, ref, gold in zip(outs, ref_outs, gold_outs, strict=True):
        assert out.dtype == torch.float32
        assert_no_worse(out, ref, gold)
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


def tied_pipeline(embedding, mix, ids_in, weights_in, ids_out, grads, backend, *, tie=True):
    """Embed mixtures with `E`, a tiny model, then log-probs with `E` as the LM head
    (`tie=False`: the embedding lookup uses a detached copy, only the LM head gets grads)."""
    embedding = embedding.detach().clone().requires_grad_()
    mix = mix.detach().clone().requires_grad_()
    lookup = embedding if tie else embedding.detach()
    inputs = mixture_embed(lookup, ids_in, weights_in, backend=backend)
    hidden = torch.tanh(inputs @ mix)
    logp, lse = mixture_logprobs(hidden, embedding, ids_out, temperature=TAU, backend=backend)
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    return embedding.grad, mix.grad


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


def test_gradient_only_where_required_and_deterministic():
    """Frozen LM head or frozen hidden; two runs give bit-identical results (no atomics)."""
    h, w, ids = make_inputs((9,), 2)
    (ref_logp, ref_lse), ref_dh, ref_dw = run(h, w, ids, backend="reference")
    grads = upstream((ref_logp, ref_lse))
    hidden = h.clone().requires_grad_()
    logp, lse = mixture_logprobs(hidden, w, ids, temperature=TAU, backend="triton")
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=2e-5, atol=2e-5)
    weight = w.clone().requires_grad_()
    logp, lse = mixture_logprobs(h, weight, ids, temperature=TAU, backend="triton")
    ((logp * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    torch.testing.assert_close(weight.grad, ref_dw, rtol=2e-5, atol=2e-5)
    first = run(h, w, ids, grads, backend="triton")
    second = run(h, w, ids, grads, backend="triton")
    for a, b in zip([*first[0], *first[1:]], [*second[0], *second[1:]], strict=True):
        assert torch.equal(a, b)


def test_int32_ids_strided_hidden_and_empty_batch():
    h, w, ids = make_inputs((6,), 2)
    wide = torch.zeros(6, 2 * H, device=DEVICE)
    wide[:, :H] = h
    logp, lse = mixture_logprobs(wide[:, :H], w, ids.int(), temperature=TAU, backend="triton")
    ref_logp, ref_lse = mixture_logprobs(h, w, ids, temperature=TAU, backend="reference")
    torch.testing.assert_close(logp, ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    empty = torch.zeros(0, H, device=DEVICE, requires_grad=True)
    weight = w.clone().requires_grad_()
    no_ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    logp, lse = mixture_logprobs(empty, weight, no_ids, backend="triton")
    (logp.sum() + lse.sum()).backward()
    assert logp.shape == (0, 2) and empty.grad.shape == (0, H) and (weight.grad == 0).all()


def count_triton_calls(monkeypatch):
    calls = []
    original = logprobs_module._logprobs_forward

    def spy(hidden, *args):
        calls.append(hidden.dtype)
        return original(hidden, *args)

    monkeypatch.setattr(logprobs_module, "_logprobs_forward", spy)
    return calls


@pytest.mark.parametrize(
    "backend, env, expected",
    [
        (None, None, "auto"),
        ("triton", None, "triton"),
        ("reference", None, "reference"),
        (None, "triton", "triton"),
        (None, "reference", "reference"),
        ("reference", "triton", "reference"),
    ],
)
def test_dispatch_branches(monkeypatch, backend, env, expected):
    if env is None:
        monkeypatch.delenv("MOTG_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MOTG_BACKEND", env)
    calls = count_triton_calls(monkeypatch)
    h, w, ids = make_inputs((4,), 2)
    logp, lse = mixture_logprobs(h, w, ids, temperature=TAU, backend=backend)
    if expected == "auto":  # Triton on CUDA, the reference on a CPU
        expected = "triton" if DEVICE == "cuda" else "reference"
    assert len(calls) == (1 if expected == "triton" else 0)
    ref_logp, ref_lse = logprobs_module.mixture_logprobs_ref(h, w, ids, TAU)
    torch.testing.assert_close(logp, ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


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
