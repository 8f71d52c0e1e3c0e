"""`backward_apart`: a piece of the graph back-propagated on its own gives the gradients of
the whole graph, with each use of a shared weight accumulated separately."""

import pytest
import torch

from motg_fast.training.backward_apart import backward_apart, can_cut


def _piece(x, w):
    """Two outputs of one piece: `[n,d]` and `[n]`."""
    y = torch.tanh(x @ w)
    return y, y.pow(2).sum(-1)


def _loss(x, w, apart: bool):
    """A graph using `w` twice: inside the piece and after it; the piece's input `x` comes
    from `w` too."""
    source = x * w.sum()
    if apart:
        leaf = source.detach().requires_grad_()
        y, s = backward_apart(_piece(leaf, w), [leaf], [source])
    else:
        y, s = _piece(source, w)
    return (y @ w).sum() + s.sum()


def test_gradients_equal_the_whole_graph_and_each_use_is_accumulated_apart():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    grads, counts = {}, {}
    for apart in (False, True):
        n = [0]
        hook = w.register_post_accumulate_grad_hook(lambda p, n=n: n.__setitem__(0, n[0] + 1))
        x.grad = w.grad = None
        _loss(x, w, apart).backward()
        hook.remove()
        grads[apart], counts[apart] = (x.grad.clone(), w.grad.clone()), n[0]
    assert counts == {False: 1, True: 2}
    for whole, cut in zip(grads[False], grads[True]):
        assert torch.allclose(whole, cut, rtol=1e-12, atol=1e-12)


def test_without_sources_the_piece_still_back_propagates():
    torch.manual_seed(1)
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    (torch.tanh(x @ w) ** 2).sum().backward()
    expected, w.grad = w.grad.clone(), None
    (h,) = backward_apart([torch.tanh(x @ w)])
    (h**2).sum().backward()
    assert torch.allclose(w.grad, expected)


def test_a_source_without_gradient_still_gets_the_piece_back_propagated():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)  # no gradient
    leaf = x.detach().requires_grad_()
    (h,) = backward_apart([torch.tanh(leaf @ w)], [leaf], [x])
    h.sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, x.t() @ (1 - torch.tanh(x @ w) ** 2))


def test_a_second_backward_or_create_graph_is_refused():
    w = torch.randn(3, requires_grad=True)
    (h,) = backward_apart([w * 2])
    loss = (h**2).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()
    (h,) = backward_apart([w * 2])
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        (h**2).sum().backward(create_graph=True)


def test_can_cut_only_while_recording_gradients():
    w = torch.ones(2, requires_grad=True)
    assert can_cut(w * 2)
    with torch.no_grad():
        assert not can_cut(w * 2)
    assert not can_cut(torch.ones(2))
    with pytest.raises(ValueError, match="one source per leaf"):
        backward_apart([w * 2], [w], [])
