"""Online softmax statistics in Triton, for a row's logsumexp and entropy in one pass.

A state `(m, s, t)` of scaled logits x seen so far is the running max `m`,
`s = Σ e^{x−m}` and `t = Σ e^{x−m}(x−m)`; then `logsumexp = m + log s` and
`entropy = log s − t/s`. The empty state is `(−inf, 0, 0)`; −inf logits contribute nothing.
Every function is elementwise over the states it is given (scalars or vectors of rows);
`tile_stats` and `reduce_stats` reduce along `AXIS`.
"""

from __future__ import annotations

from ._backend import jit, tl


@jit
def reduce_stats(m, s, t, AXIS: tl.constexpr):
    """Merge the states `(m, s, t)` along `AXIS` into one state (per remaining index)."""
    top = tl.max(m, AXIS)
    pivot = tl.where(top == float("-inf"), 0.0, top)
    if AXIS == 1:
        pivot = pivot[:, None]
    scale = tl.exp(m - pivot)  # 0 for empty states (m = −inf)
    shift = tl.where(m == float("-inf"), 0.0, m - pivot)
    return top, tl.sum(scale * s, AXIS), tl.sum(scale * (t + shift * s), AXIS)


@jit
def tile_stats(x, x_max, AXIS: tl.constexpr):
    """The state of scaled logits `x` (−inf allowed) along `AXIS`, given their max `x_max`
    along it: `x [N]` with a scalar max (AXIS 0), or `x [R,N]` with `x_max [R]` (AXIS 1)."""
    pivot = tl.where(x_max == float("-inf"), 0.0, x_max)
    if AXIS == 1:
        pivot = pivot[:, None]
    e = tl.exp(x - pivot)
    shift = tl.where(x == float("-inf"), 0.0, x - pivot)
    return x_max, tl.sum(e, AXIS), tl.sum(e * shift, AXIS)


@jit
def combine_stats(m1, s1, t1, m2, s2, t2):
    """Combine two states, elementwise (either may be empty: m = −inf, s = t = 0)."""
    m = tl.maximum(m1, m2)
    pivot = tl.where(m == float("-inf"), 0.0, m)
    a1 = tl.exp(m1 - pivot)
    a2 = tl.exp(m2 - pivot)
    d1 = tl.where(m1 == float("-inf"), 0.0, m1 - pivot)
    d2 = tl.where(m2 == float("-inf"), 0.0, m2 - pivot)
    return m, a1 * s1 + a2 * s2, a1 * (t1 + d1 * s1) + a2 * (t2 + d2 * s2)
