"""Running top-k of packed (score, id) keys, in Triton (device functions of the rollout step).

A key is one int64: the high 32 bits hold a float32 score's bits mapped to a signed integer
of the same order (−0.0 folded onto +0.0), the low 32 bits `2**32 − 1 − id`. Integer order
of keys is then exactly the ranking of `mixture_math.ordering_keys`: higher score first,
the lower id first on ties, −inf below every finite score. Real keys are
`> −2**63 + 2**40`; below that lie `KEY_EMPTY` (an empty lane) and the distinct
placeholders a running top-k starts with (`empty_top`, all below `KEY_FLOOR`).

A running top-k is a `[K_PAD]` vector of distinct keys in no order, with its minimum `kth`;
`absorb` folds a tile of candidate keys into it and `sort_desc` (or `place_desc`, which
leaves the first slots free) orders it at the end.
"""

from __future__ import annotations

from ._backend import constexpr, jit, tl

KEY_EMPTY = constexpr(-(2**63))
KEY_FLOOR = constexpr(-(2**63) + 2**16)


@jit
def pack_keys(score, cols):
    """int64 keys of float32 `score` at int64 `cols`, as `mixture_math.ordering_keys`."""
    score = tl.where(score == 0.0, 0.0, score)  # −0.0 ranks as +0.0
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << 32) | (0xFFFFFFFF - cols)


@jit
def key_ids(keys):
    """Token ids (int64) packed in `keys`."""
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


@jit
def key_score(key):
    """The float32 score packed in `key` (meaningless for a placeholder key)."""
    ordered = key >> 32
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@jit
def empty_top(K_PAD: tl.constexpr):
    """A running top-k holding K_PAD distinct placeholders (all below `KEY_FLOOR`)."""
    return KEY_EMPTY + 1 + tl.arange(0, K_PAD).to(tl.int64)


@jit
def absorb(top, kth, cand):
    """Insert the keys of `cand [N]` that beat the k-th key into the running `top [K_PAD]`.

    `top` is unordered with distinct keys, `kth` its minimum. Candidates are taken best
    first and each replaces the current minimum, until none beats it: the number of rounds
    is the number of keys that enter the top-k, usually 0 after the first tiles of a row.
    """
    best = tl.max(cand, 0)
    while best > kth:
        top = tl.where(top == kth, best, top)
        kth = tl.min(top, 0)
        cand = tl.where(cand == best, KEY_EMPTY, cand)
        best = tl.max(cand, 0)
    return top, kth


@jit
def sort_desc(top, K_PAD: tl.constexpr):
    """`top [K_PAD]` (distinct keys) in descending order, by rank counting."""
    return place_desc(top, K_PAD, 0)


@jit
def place_desc(top, K_PAD: tl.constexpr, FIRST: tl.constexpr):
    """`[K_PAD]`: the keys of `top [K_PAD]` (distinct) in descending order from slot
    `FIRST` on (the key of rank r at slot `FIRST + r`; slots below `FIRST` hold 0, the
    `FIRST` smallest keys drop out), by rank counting."""
    rank = tl.sum((top[None, :] > top[:, None]).to(tl.int32), 1)
    slots = tl.arange(0, K_PAD)
    return tl.sum(tl.where(rank[:, None] + FIRST == slots[None, :], top[:, None], 0), 0)
