"""Triton `mixture_embed` (forward and backward) against the PyTorch reference.

On a CPU the Triton path runs in Triton's interpreter (tests/conftest.py sets
`TRITON_INTERPRET=1`); on a GPU the same tests run on CUDA tensors.
"""

import importlib

import pytest
import torch

from motg_fast.kernels import mixture_embed, mixture_embed_ref

embed_module = importlib.import_module("motg_fast.kernels.mixture_embed")


pytestmark = pytest.mark.interpreter  # Triton's interpreter on a CPU: seconds each

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter truncates float32 → 16-bit casts (error up to 1 ulp where rounding
# gives 1/2): allow twice the reference's error there, 1.25 times on a GPU.
SLACK = 2.0 if DEVICE == "cpu" else 1.25
FP32_EPS = torch.finfo(torch.float32).eps
V, H = 37, 50  # not powers of two; H spans a partial block


def make_inputs(lead, k, *, dtype=torch.float32, vocab=V, hidden=H, seed=0):
    """Embedding `[vocab,hidden]`, ids and weights `lead + (k,)`; ids repeat across rows."""
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, vocab, (*lead, k), generator=gen)
    ids.view(-1)[: max(1, ids.numel() // 3)] = 3  # a third of the slots share one row
    weights = torch.rand(*lead, k, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    return embedding.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)


def run(embedding, ids, weights, grad, **kwargs):
    """`(out, dE, dw)` of one forward and backward with upstream `grad`."""
    embedding = embedding.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    out = mixture_embed(embedding, ids, weights, **kwargs)
    out.backward(grad)
    return out.detach(), embedding.grad, weights.grad


def max_err(result, gold):
    return (result.double() - gold.double()).abs().max().item()


def assert_no_worse(result, reference, gold):
    """Low-precision rule: the result is no further from the float64 gold than the reference
    is, times SLACK, plus a few float32 ulps of the largest gold value (float32 noise)."""
    allowed = SLACK * max_err(reference, gold) + 4 * FP32_EPS * gold.abs().max().item()
    assert max_err(result, gold) <= allowed, (max_err(result, gold), allowed)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp32_forward_and_grads_match_reference(k, deterministic):
    embedding, ids, weights = make_inputs((3, 4), k)
    grad = torch.randn(3, 4, H, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, d_emb, d_w = run(
        embedding, ids, weights, grad, backend="triton", deterministic=deterministic
    )
    ref, ref_emb, ref_w = run(embedding, ids, weights, grad, backend="reference")
    assert out.shape == (3, 4, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_emb, ref_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_w, ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_half_precision_no_worse_than_reference(dtype, deterministic):
    embedding, ids, weights = make_inputs((9,), 2, dtype=dtype)
    grad = torch.randn(9, H, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    out, d_emb, d_w = run(
        embedding, ids, weights, grad, backend="triton", deterministic=deterministic
    )
    ref, ref_emb, ref_w = run(embedding, ids, weights, grad, backend="reference")
    gold, gold_emb, gold_w = run(embedding.double(), ids, weights.double(), grad.double())
    assert out.dtype == dtype and d_emb.dtype == dtype and d_w.dtype == torch.float32
    assert_no_worse(out, ref, gold)
    assert_no_worse(d_emb, ref_emb, gold_emb)
    assert_no_worse(d_w, ref_w, gold_w)


@pytest.mark.parametrize("deterministic", [False, True])
def test_repeated_ids_accumulate_every_slot(deterministic):
    """Every slot of every row hits one vocabulary row: dE[row] = Σ_n Σ_j w_nj de_n."""
    embedding, _, weights = make_inputs((40,), 3)
    ids = torch.full((40, 3), 7, device=DEVICE)
    grad = torch.randn(40, H, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _, d_emb, d_w = run(
        embedding, ids, weights, grad, backend="triton", deterministic=deterministic
    )
    expected = (weights.sum(-1, keepdim=True) * grad).sum(0)
    torch.testing.assert_close(d_emb[7], expected, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(V, dtype=torch.bool, device=DEVICE)
    untouched[7] = False
    assert (d_emb[untouched] == 0).all()
    torch.testing.assert_close(d_w, (grad @ embedding[7]).unsqueeze(-1).expand(40, 3))


def test_deterministic_mode_is_bit_identical_across_runs():
    embedding, ids, weights = make_inputs((64,), 2, seed=4)
    ids = ids % 5  # many rows share few vocabulary entries, runs longer than BLOCK_M
    grad = torch.randn(64, H, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    first = run(embedding, ids, weights, grad, backend="triton", deterministic=True)
    second = run(embedding, ids, weights, grad, backend="triton", deterministic=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    _, ref_emb, _ = run(embedding, ids, weights, grad, backend="reference")
    torch.testing.assert_close(first[1], ref_emb, rtol=1e-5, atol=1e-5)


def test_discrete_positions_reduce_to_an_embedding_lookup():
    """`w = [1, 0]` is a token lookup; zero-weight slots add nothing to dE."""
    embedding, ids, _ = make_inputs((6,), 2)
    weights = torch.tensor([1.0, 0.0], device=DEVICE).expand(6, 2).contiguous()
    grad = torch.randn(6, H, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    for deterministic in (False, True):
        out, d_emb, _ = run(
            embedding, ids, weights, grad, backend="triton", deterministic=deterministic
        )
        torch.testing.assert_close(out, embedding[ids[:, 0]])
        expected = torch.zeros_like(embedding).index_add_(0, ids[:, 0], grad)
        torch.testing.assert_close(d_emb, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gradient_only_where_required(deterministic):
    """Stored weights carry no grad (the training case); a frozen embedding gets none."""
    embedding, ids, weights = make_inputs((5,), 2)
    grad = torch.randn(5, H, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    emb = embedding.clone().requires_grad_()
    mixture_embed(emb, ids, weights, backend="triton", deterministic=deterministic).backward(grad)
    _, ref_emb, ref_w = run(embedding, ids, weights, grad, backend="reference")
    torch.testing.assert_close(emb.grad, ref_emb, rtol=1e-5, atol=1e-5)
    w = weights.clone().requires_grad_()
    mixture_embed(embedding, ids, w, backend="triton", deterministic=deterministic).backward(grad)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-5)


def test_int32_ids_strided_embedding_and_empty_batch():
    embedding, ids, weights = make_inputs((4,), 2)
    wide = torch.randn(V, 2 * H, device=DEVICE)
    wide[:, :H] = embedding
    view = wide[:, :H]  # row stride 2H
    out = mixture_embed(view, ids.int(), weights, backend="triton")
    torch.testing.assert_close(out, mixture_embed_ref(embedding, ids, weights))
    empty_ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    emb = embedding.clone().requires_grad_()
    w = torch.zeros(0, 2, device=DEVICE, requires_grad=True)
    out = mixture_embed(emb, empty_ids, w, backend="triton")
    out.sum().backward()
    assert out.shape == (0, H) and (emb.grad == 0).all() and w.grad.shape == (0, 2)


def count_triton_calls(monkeypatch):
    calls = []
    original = embed_module.launch_embed_forward

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(embed_module, "launch_embed_forward", spy)
    return calls


def test_float64_runs_the_reference_and_errors_stay_clear(monkeypatch):
    calls = count_triton_calls(monkeypatch)
    embedding, ids, weights = make_inputs((3,), 2, dtype=torch.float64)
    out = mixture_embed(embedding, ids, weights.double(), backend="triton")
    assert not calls and out.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown backend"):
        mixture_embed(embedding, ids, weights, backend="cuda")
    with pytest.raises(ValueError, match="ids"):
        mixture_embed(embedding, ids + V, weights, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_real_shapes(deterministic):
    """Qwen2.5-1.5B embedding, 8192 positions, k = 2, bf16; fp32 inputs give the gold."""
    vocab, hidden, n = 151936, 1536, 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    embedding = torch.randn(vocab, hidden, device="cuda", generator=gen).bfloat16()
    ids = torch.randint(0, vocab, (n, 2), device="cuda", generator=gen)
    ids[::4, 0] = 11  # a frequent token
    weights = torch.rand(n, 2, device="cuda", generator=gen)
    grad = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    out, d_emb, d_w = run(
        embedding, ids, weights, grad, backend="triton", deterministic=deterministic
    )
    ref, ref_emb, ref_w = run(embedding, ids, weights, grad, backend="reference")
    gold, gold_emb, gold_w = run(embedding.float(), ids, weights, grad.float(), backend="reference")
    assert_no_worse(out, ref, gold)
    assert_no_worse(d_emb, ref_emb, gold_emb)
    assert_no_worse(d_w, ref_w, gold_w)
    if deterministic:
        again = run(embedding, ids, weights, grad, backend="triton", deterministic=True)
        assert torch.equal(again[1], d_emb)


def discrete_positions():
    """Six discrete positions (`w = [1, 0]`): live ids reuse rows 0–3, the zero-weight slots
    point at rows that no live slot uses."""
    embedding, _, _ = make_inputs((1,), 1)
    live = torch.tensor([0, 1, 2, 3, 0, 1], device=DEVICE)
    dead = torch.tensor([30, 31, 32, 33, 34, 36], device=DEVICE)
    weights = torch.tensor([1.0, 0.0], device=DEVICE).expand(6, 2).contiguous()
    return embedding, live, dead, torch.stack([live, dead], dim=-1), weights


# The interpreter evaluates `0 · inf` for the masked-off lanes too (and stores nothing).
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [False, True])
def test_zero_weight_slots_add_nothing_to_dE(deterministic):
    """No add into `dE` for a zero-weight slot: with an overflowed upstream gradient (+inf in
    one column) the live rows get inf there and the zero-weight slots' rows stay exactly 0,
    where a masked-in `0 · inf` add would write NaN."""
    embedding, live, dead, ids, weights = discrete_positions()
    grad = torch.randn(6, H, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    grad[:, 5] = float("inf")
    _, d_emb, _ = run(embedding, ids, weights, grad, backend="triton", deterministic=deterministic)
    assert (d_emb[dead] == 0).all(), "zero-weight slots added into their dE rows"
    expected = torch.zeros_like(embedding).index_add_(0, live, grad)
    finite = torch.arange(H, device=DEVICE) != 5
    torch.testing.assert_close(d_emb[:, finite], expected[:, finite], rtol=1e-5, atol=1e-5)
    assert torch.isposinf(d_emb[live, 5]).all()


def test_zero_weight_slots_rows_are_not_read():
    """The forward reads no row of a zero-weight slot: inf there leaves the output exactly the
    live rows (a read would give `0 · inf = NaN`)."""
    embedding, live, dead, ids, weights = discrete_positions()
    poisoned = embedding.clone()
    poisoned[dead] = float("inf")
    out = mixture_embed(poisoned, ids, weights, backend="triton")
    torch.testing.assert_close(out, embedding[live], rtol=0, atol=0)
