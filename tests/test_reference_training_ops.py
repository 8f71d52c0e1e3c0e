"""References of the training ops: values, gradients (float64 gradcheck), shapes."""

import pytest
import torch

from motg_fast.kernels import mixture_embed, mixture_logprobs


def _inputs(n=4, k=3, vocab=11, hidden=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    ids = torch.randint(0, vocab, (n, k), generator=g)
    weights = torch.softmax(torch.randn(n, k, generator=g, dtype=dtype), -1)
    hidden_states = torch.randn(n, hidden, generator=g, dtype=dtype)
    return embedding, ids, weights, hidden_states


def test_mixture_embed_is_the_weighted_sum_of_rows():
    embedding, ids, weights, _ = _inputs(dtype=torch.float32)
    out = mixture_embed(embedding, ids, weights)
    expected = torch.stack(
        [sum(w * embedding[i] for i, w in zip(r, ws)) for r, ws in zip(ids, weights)]
    )
    assert torch.allclose(out, expected, atol=1e-6)


def test_mixture_embed_keeps_leading_dims_and_dtype():
    embedding, ids, weights, _ = _inputs(n=6, dtype=torch.bfloat16)
    out = mixture_embed(embedding, ids.view(2, 3, 3), weights.view(2, 3, 3))
    assert out.shape == (2, 3, 6) and out.dtype == torch.bfloat16


def test_mixture_embed_one_hot_weights_equal_embedding_lookup():
    embedding, ids, _, _ = _inputs(dtype=torch.float32)
    one_hot = torch.zeros(4, 3)
    one_hot[:, 0] = 1
    assert torch.equal(mixture_embed(embedding, ids, one_hot), embedding[ids[:, 0]])


def test_mixture_embed_gradcheck_with_repeated_ids():
    embedding, ids, weights, _ = _inputs()
    ids[1] = ids[0]  # the same row hit several times must accumulate
    embedding.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, w: mixture_embed(e, ids, w), (embedding, weights))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mixture_logprobs_match_log_softmax(temperature):
    embedding, ids, _, hidden = _inputs(dtype=torch.float32)
    logprobs, lse = mixture_logprobs(hidden, embedding, ids, temperature=temperature)
    logits = hidden @ embedding.T / temperature
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(-1, ids), atol=1e-5)
    assert torch.allclose(lse, logits.logsumexp(-1), atol=1e-5)


def test_mixture_logprobs_leading_dims():
    embedding, ids, _, hidden = _inputs(n=6, dtype=torch.float32)
    lp, lse = mixture_logprobs(hidden.view(2, 3, 6), embedding, ids.view(2, 3, 3))
    flat_lp, flat_lse = mixture_logprobs(hidden, embedding, ids)
    assert torch.equal(lp.view(6, 3), flat_lp) and torch.equal(lse.view(6), flat_lse)


def test_mixture_logprobs_gradcheck_both_outputs():
    embedding, ids, _, hidden = _inputs()
    embedding.requires_grad_(True)
    hidden.requires_grad_(True)

    def fn(h, w):
        lp, lse = mixture_logprobs(h, w, ids, temperature=0.8)
        return lp, lse

    assert torch.autograd.gradcheck(fn, (hidden, embedding))


def test_tied_embedding_and_head_gradients_add_up():
    embedding, ids, weights, _ = _inputs()
    embedding.requires_grad_(True)
    inputs = mixture_embed(embedding, ids, weights)
    lp, _ = mixture_logprobs(torch.tanh(inputs), embedding, ids)
    assert torch.autograd.gradcheck(
        lambda e: mixture_logprobs(torch.tanh(mixture_embed(e, ids, weights)), e, ids)[0],
        (embedding,),
    )
    lp.sum().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
