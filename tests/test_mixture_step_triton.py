"""The Triton rollout step against its PyTorch reference.

On a CPU the kernels run in Triton's interpreter (vocabularies of a few thousand, a few
rows); tests marked `gpu` run the real shapes (V = 151936) when CUDA is present. The Triton
path draws its noise from Philox; `philox_step_noise` materialises it, and the reference fed
with that noise (and a generator in the same state for the Dirichlet draws) must give the
same ids, mask and token, and the same values within float32 tolerances.
"""

import importlib
import itertools
import math

import pytest
import torch

from motg_fast.kernels import (
    HAS_TRITON,
    REPRESENTATIVES,
    SELECTIONS,
    WEIGHTINGS,
    MixtureSpec,
    StepNoise,
    gumbel_noise,
    mixture_step,
    mixture_step_ref,
    mixture_step_triton,
    philox_step_noise,
    philox_step_seed,
    triton_interpreter_on,
)
from motg_fast.kernels.mixture_math import inverse_temperature
from motg_fast.kernels.mixture_step import (
    full_distribution_stats,
    selection_noise_shape,
    split_count,
    split_plan,
    triton_unsupported,
)
from motg_fast.kernels.spec import RANDOM_SELECTIONS

CUDA = torch.cuda.is_available()

DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [
    pytest.mark.interpreter,  # Triton's interpreter on a CPU: seconds each
    pytest.mark.skipif(
        not HAS_TRITON or not (CUDA or triton_interpreter_on()),
        reason="needs triton with CUDA or the interpreter (TRITON_INTERPRET=1)",
    ),
    # the interpreter's numpy warns on log(0) = −inf (a Dirichlet weight that underflows)
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]


# ------------------------------------------------------------------------------ helpers


def make_inputs(rows, vocab, hidden, *, seed=0, dtype=torch.float32, scale=3.0):
    """Logits `[rows, vocab]` (N(0, scale²)) and an embedding `[vocab, hidden]`."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, device=DEVICE) * scale).to(dtype)
    embedding = torch.randn(vocab, hidden, generator=gen, device=DEVICE)
    return logits, embedding.to(dtype)


def draws_seed(spec: MixtureSpec) -> bool:
    """Whether the Triton path draws a Philox seed for this spec (no explicit noise)."""
    return (
        spec.selection in RANDOM_SELECTIONS
        or spec.weighting == "gumbel"
        or spec.representative == "sample"
    )


def materialised_noise(spec: MixtureSpec, generator, batch, vocab) -> StepNoise:
    """The Philox noise of a Triton step whose seed `generator` draws next (iid: `[B,k,V]`)."""
    seed = philox_step_seed(generator, DEVICE)
    draws = spec.k if spec.selection == "iid" else None
    sel, weight, token = philox_step_noise(seed, batch, vocab, spec.k, draws=draws)
    return StepNoise(
        selection=sel, weight=weight if spec.weighting == "gumbel" else None, token=token
    )


def run_pair(logits, embedding, *, seed=0, splits=None, block_v=None, **kw):
    """`(triton, reference)` steps of `MixtureSpec(**kw)` that share every random draw."""
    spec = MixtureSpec(**kw)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    got = mixture_step_triton(
        logits, embedding, spec, generator=gen, vocab_splits=splits, block_v=block_v
    )
    twin = torch.Generator(device=DEVICE).manual_seed(seed)
    noise = StepNoise()
    if draws_seed(spec):
        noise = materialised_noise(spec, twin, *logits.shape)
    want = mixture_step_ref(logits, embedding, spec, generator=twin, noise=noise)
    return got, want


def run_explicit(logits, embedding, *, seed=0, splits=None, block_v=None, **kw):
    """`(triton, reference)` steps of `MixtureSpec(**kw)` given the same explicit noise
    (`torch.rand` Gumbel, bf16 selection noise) and generator state (Dirichlet draws)."""
    spec = MixtureSpec(**kw)
    batch, vocab = logits.shape
    gen = torch.Generator(device=DEVICE).manual_seed(1000 + seed)
    shape = selection_noise_shape(spec, batch, vocab)
    noise = StepNoise(
        selection=gumbel_noise(shape, device=DEVICE, generator=gen).to(torch.bfloat16),
        weight=gumbel_noise((batch, spec.k), device=DEVICE, generator=gen)
        if spec.weighting == "gumbel"
        else None,
        token=gumbel_noise((batch, spec.k), device=DEVICE, generator=gen),
    )
    got = mixture_step_triton(
        logits,
        embedding,
        spec,
        generator=torch.Generator(device=DEVICE).manual_seed(seed),
        noise=noise,
        vocab_splits=splits,
        block_v=block_v,
    )
    twin = torch.Generator(device=DEVICE).manual_seed(seed)
    want = mixture_step_ref(logits, embedding, spec, generator=twin, noise=noise)
    return got, want


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bfloat16 ulp at the magnitude of `x` (float32)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


def assert_embeds_close(got, want, embedding, ids, weights):
    """fp32: tight. Low precision: no further from an fp32 gold than the reference, up to
    one ulp (the interpreter truncates float32 → bf16 instead of rounding)."""
    if embedding.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        return
    gold = (weights.unsqueeze(-1) * embedding[ids].float()).sum(1)
    err_got = (got.float() - gold).abs()
    err_want = (want.float() - gold).abs()
    assert (err_got <= err_want + bf16_ulp(gold) + 1e-6).all(), (err_got - err_want).max()


def equal_steps(a, b) -> bool:
    """Every field of two `MixtureStep`s equal (optional fields None in both)."""
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def assert_same_step(got, want, embedding, *, weight_atol=1e-5):
    """Exact ids / mask / token / token slot, float32-close values, identical dtypes and
    shapes (and the same optional fields)."""
    for name, a, b in zip(want._fields, got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape)
    assert torch.equal(got.ids, want.ids), (got.ids, want.ids)
    assert torch.equal(got.mask, want.mask), (got.mask, want.mask)
    assert torch.equal(got.token, want.token), (got.token, want.token)
    assert torch.equal(got.token_slot, want.token_slot), (got.token_slot, want.token_slot)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(got.logsumexp, want.logsumexp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.weights, want.weights, atol=weight_atol, rtol=1e-4)
    torch.testing.assert_close(
        got.weight_logits, want.weight_logits, atol=max(weight_atol, 3e-5), rtol=1e-4
    )
    if want.rest_logprob is not None:
        torch.testing.assert_close(got.rest_logprob, want.rest_logprob, atol=3e-5, rtol=1e-5)
    assert_embeds_close(got.embeds, want.embeds, embedding, want.ids, want.weights)


# ------------------------------------------------------------- every mode vs reference

# The selections with distinct ids (the tests below also check selection-specific results);
# `iid` and `sample_topk` have their own tests further down.
DISTINCT_SELECTIONS = ("topk", "sample")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("weighting", ["prob", "dirichlet", "gumbel"])
@pytest.mark.parametrize("selection", DISTINCT_SELECTIONS)
def test_matches_reference(selection, weighting, k, dtype):
    # odd k: one program per row; even k: the vocabulary split over 3 programs + merge
    splits = 1 if k % 2 else 3
    vocab = 3001 if k != 2 else 2048
    logits, embedding = make_inputs(3, vocab, 40, seed=k, dtype=dtype)
    got, want = run_pair(
        logits, embedding, seed=k, splits=splits, k=k, temperature=0.8,
        selection=selection, weighting=weighting, gumbel_temperature=0.7,
    )  # fmt: skip
    assert_same_step(got, want, embedding, weight_atol=1e-4 if weighting == "dirichlet" else 1e-5)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("selection", DISTINCT_SELECTIONS)
def test_ties_rank_the_lower_id_first(selection, splits):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    # integer logits in a small range: every value is shared by hundreds of tokens
    logits = torch.randint(-4, 3, (3, 2500), generator=gen, device=DEVICE).to(torch.bfloat16)
    embedding = torch.randn(2500, 24, generator=gen, device=DEVICE)
    got, want = run_pair(
        logits, embedding, splits=splits, k=8, selection=selection, representative="argmax"
    )
    assert_same_step(got, want, embedding)
    if selection == "topk":  # the 8 lowest ids holding the row maximum, in id order
        top_ids = (
            (logits == logits.max(-1, keepdim=True).values)
            .float()
            .argsort(dim=-1, descending=True, stable=True)[:, :8]
        )
        assert torch.equal(got.ids, top_ids)
        # equal logits give equal weights; argmax picks the first (lowest) slot
        assert torch.equal(got.token, got.ids[:, 0])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("selection", DISTINCT_SELECTIONS)
def test_masked_vocabulary(selection, splits):
    logits, embedding = make_inputs(4, 2000, 16, seed=5)
    logits[0, ::2] = float("-inf")  # half the vocabulary masked
    logits[1, :] = float("-inf")
    logits[1, [7, 1500, 1999]] = torch.tensor([0.5, 2.0, -1.0], device=DEVICE)  # 3 finite < k
    logits[2, :] = float("-inf")
    logits[2, 1234] = 0.0  # a single finite entry
    got, want = run_pair(logits, embedding, splits=splits, k=8, selection=selection)
    assert_same_step(got, want, embedding)
    assert set(got.ids[1, :3].tolist()) == {7, 1500, 1999}
    assert got.ids[1, 3:].tolist() == [0, 1, 2, 3, 4]  # masked slots: lowest −inf ids
    assert not got.mask[1, 3:].any() and got.mask[1, :3].all()
    assert torch.equal(got.weights[2], torch.eye(8, device=DEVICE)[0])
    assert got.token[2].item() == 1234 and got.entropy[2].item() == 0.0
    assert torch.isinf(got.logprobs[1, 3:]).all()


@pytest.mark.parametrize(
    "filters", [{"top_p": 0.6}, {"min_p": 0.1}, {"top_p": 0.9, "min_p": 0.02}], ids=str
)
@pytest.mark.parametrize("selection", DISTINCT_SELECTIONS)
def test_top_p_and_min_p_filters(selection, filters):
    logits, embedding = make_inputs(4, 1500, 16, seed=2, scale=4.0)  # peaked rows
    got, want = run_pair(logits, embedding, k=8, selection=selection, **filters)
    assert_same_step(got, want, embedding)
    assert (~got.mask).any(), "the filters must remove some slots here"
    assert torch.equal(got.weights[~got.mask], torch.zeros_like(got.weights[~got.mask]))


@pytest.mark.parametrize("splits", [1, 5])
def test_k1_topk_is_greedy(splits):
    logits, embedding = make_inputs(3, 3001, 32, seed=9)
    got = mixture_step_triton(logits, embedding, MixtureSpec(k=1), vocab_splits=splits)
    greedy = logits.argmax(-1)
    assert torch.equal(got.ids[:, 0], greedy) and torch.equal(got.token, greedy)
    assert torch.equal(got.weights, torch.ones(3, 1, device=DEVICE))
    assert torch.equal(got.embeds, embedding[greedy])


@pytest.mark.parametrize("splits", [1, 5])
def test_k1_sample_is_gumbel_max(splits):
    logits, embedding = make_inputs(3, 3001, 32, seed=4, scale=1.0)
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    spec = MixtureSpec(k=1, temperature=0.7, selection="sample")
    got = mixture_step_triton(logits, embedding, spec, generator=gen, vocab_splits=splits)
    seed = philox_step_seed(torch.Generator(device=DEVICE).manual_seed(17), DEVICE)
    noise = philox_step_noise(seed, 3, 3001, 1)[0]
    expected = (logits / 0.7 + noise).argmax(-1)
    assert torch.equal(got.token, expected) and torch.equal(got.ids[:, 0], expected)
    assert torch.equal(got.embeds, embedding[expected])


# --------------------------------------- iid, sample_topk, uniform, blend, first vs reference

OLD_MODES = set(
    itertools.product(DISTINCT_SELECTIONS, ("prob", "dirichlet", "gumbel"), ("sample", "argmax"))
)
NEW_MODES = [
    mode
    for mode in itertools.product(SELECTIONS, WEIGHTINGS, REPRESENTATIVES)
    if mode not in OLD_MODES and mode[1:] != ("blend", "sample")  # blend needs slot 0
]
NEW_SELECTIONS = ("iid", "sample_topk")


@pytest.mark.parametrize(
    ("selection", "weighting", "representative"), NEW_MODES, ids=["-".join(m) for m in NEW_MODES]
)
def test_new_modes_match_reference(selection, weighting, representative):
    # both noise sources on both paths across the matrix: Philox on one path, explicit noise
    # on the other (one program per row, or 4 splits of 256 columns + merge)
    index = NEW_MODES.index((selection, weighting, representative))
    k = (2, 3, 5)[index % 3]
    dtype = torch.bfloat16 if index % 2 else torch.float32
    logits, embedding = make_inputs(2, 777, 24, seed=index, dtype=dtype)
    settings = dict(
        k=k, temperature=0.8, selection=selection, weighting=weighting,
        representative=representative, gumbel_temperature=0.7, blend_beta=0.6,
    )  # fmt: skip
    philox_splits, explicit_splits = (1, 4) if index % 2 else (4, 1)
    atol = 1e-4 if weighting == "dirichlet" else 1e-5
    got, want = run_pair(
        logits, embedding, seed=index, splits=philox_splits, block_v=128, **settings
    )
    assert_same_step(got, want, embedding, weight_atol=atol)
    got, want = run_explicit(
        logits, embedding, seed=index, splits=explicit_splits, block_v=128, **settings
    )
    assert_same_step(got, want, embedding, weight_atol=atol)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("selection", NEW_SELECTIONS)
def test_new_selections_masked_vocabulary(selection, splits):
    logits, embedding = make_inputs(4, 2000, 16, seed=5)
    logits[0, ::2] = float("-inf")  # half the vocabulary masked
    logits[1, :] = float("-inf")
    logits[1, [7, 1500, 1999]] = torch.tensor([0.5, 2.0, -1.0], device=DEVICE)  # 3 finite < k
    logits[2, :] = float("-inf")
    logits[2, 1234] = 0.0  # a single finite entry
    got, want = run_pair(
        logits, embedding, splits=splits, k=8, selection=selection, weighting="uniform"
    )
    assert_same_step(got, want, embedding)
    assert torch.isfinite(got.logprobs[0]).all() and (got.ids[0] % 2 == 1).all()
    if selection == "iid":  # every draw lands on a finite entry
        assert set(got.ids[1].tolist()) <= {7, 1500, 1999}
        assert (got.ids[2] == 1234).all() and got.mask[2].all()
        assert torch.equal(got.weights[2], torch.full((8,), 0.125, device=DEVICE))
    else:  # y, the other finite entries, then the lowest −inf ids
        assert set(got.ids[1, :3].tolist()) == {7, 1500, 1999}
        assert got.ids[1, 3:].tolist() == [0, 1, 2, 3, 4]
        assert got.ids[2].tolist() == [1234, 0, 1, 2, 3, 4, 5, 6]
        assert torch.equal(got.weights[2], torch.eye(8, device=DEVICE)[0])
    assert got.token[2].item() == 1234 and got.entropy[2].item() == 0.0


@pytest.mark.parametrize("splits", [1, 3])
def test_sample_topk_drawn_token_ranks_below_every_other_token(splits):
    # only tokens 1 and 1500 are finite and 1 is drawn: the other slots rank the remaining
    # tokens, −inf ones by id, without 1: ids [1, 1500, 0, 2]
    logits, embedding = make_inputs(2, 2000, 16, seed=6)
    logits[:] = float("-inf")
    logits[:, 1], logits[:, 1500] = 30.0, 0.0
    got, want = run_pair(
        logits, embedding, splits=splits, block_v=512, k=4, selection="sample_topk",
        weighting="blend", representative="first",
    )  # fmt: skip
    assert_same_step(got, want, embedding)
    assert got.ids.tolist() == [[1, 1500, 0, 2]] * 2
    assert got.mask.tolist() == [[True, True, False, False]] * 2
    assert torch.equal(got.token_slot, torch.zeros(2, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("selection", NEW_SELECTIONS)
def test_new_selections_ties_rank_the_lower_id_first(selection, splits):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    logits = torch.randint(-4, 3, (3, 2500), generator=gen, device=DEVICE).to(torch.bfloat16)
    embedding = torch.randn(2500, 24, generator=gen, device=DEVICE)
    got, want = run_pair(
        logits, embedding, splits=splits, k=8, selection=selection, representative="argmax"
    )
    assert_same_step(got, want, embedding)
    if selection == "sample_topk":  # after y: the lowest ids holding the row maximum
        top = logits.float().max(-1, keepdim=True).values
        for row in range(3):
            at_max = (logits[row].float() == top[row]).nonzero().flatten()
            rest = [i for i in at_max.tolist() if i != got.ids[row, 0].item()][:7]
            assert got.ids[row, 1:].tolist() == rest


@pytest.mark.parametrize(
    "filters", [{"top_p": 0.6}, {"min_p": 0.1}, {"top_p": 0.9, "min_p": 0.02}], ids=str
)
@pytest.mark.parametrize("selection", NEW_SELECTIONS)
def test_new_selections_top_p_and_min_p_filters(selection, filters):
    logits, embedding = make_inputs(4, 1500, 16, seed=2, scale=4.0)  # peaked rows
    got, want = run_pair(
        logits, embedding, k=8, selection=selection, weighting="blend",
        representative="argmax", **filters,
    )  # fmt: skip
    assert_same_step(got, want, embedding)
    assert torch.equal(got.weights[~got.mask], torch.zeros_like(got.weights[~got.mask]))


@pytest.mark.parametrize("splits", [1, 3])
def test_iid_duplicates_keep_the_drawn_slot(splits):
    # peaked rows: every draw hits token 5, so the k slots repeat it and the token slot is
    # the drawn one, not the first slot holding the token
    logits, embedding = make_inputs(8, 900, 16, seed=7, scale=1.0)
    logits[:6, 5] = 14.0
    spec = dict(k=4, selection="iid", weighting="uniform", representative="sample")
    got, want = run_pair(logits, embedding, seed=3, splits=splits, block_v=128, **spec)
    assert_same_step(got, want, embedding)
    assert (got.ids[:6] == 5).all() and (got.token[:6] == 5).all()
    assert (got.token_slot[:6] != 0).any()
    assert torch.equal(got.ids.gather(-1, got.token_slot[:, None])[:, 0], got.token)
    assert torch.equal(got.weights[:6], torch.full((6, 4), 0.25, device=DEVICE))
    torch.testing.assert_close(got.embeds[:6], embedding[5].expand(6, -1))
    spec["representative"] = "argmax"  # equal weights: the first slot
    got, want = run_pair(logits, embedding, seed=3, splits=splits, block_v=128, **spec)
    assert_same_step(got, want, embedding)
    assert (got.token_slot[:6] == 0).all()


@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("selection", NEW_SELECTIONS)
def test_k1_new_selections_equal_sample(selection, splits):
    # iid draw 0 and sample_topk's slot 0 are the `sample` stream: k = 1 is the same step
    logits, embedding = make_inputs(3, 3001, 32, seed=4, scale=1.0)
    steps = []
    for mode in ("sample", selection):
        gen = torch.Generator(device=DEVICE).manual_seed(17)
        spec = MixtureSpec(k=1, temperature=0.7, selection=mode)
        steps.append(
            mixture_step_triton(logits, embedding, spec, generator=gen, vocab_splits=splits)
        )
    for name, a, b in zip(steps[0]._fields, *steps, strict=True):
        if name == "rest_logprob":  # only `sample` with k >= 2 carries it
            continue
        assert torch.equal(a, b), name


def test_largest_k_for_the_new_selections():
    logits, embedding = make_inputs(2, 700, 16, seed=15, scale=2.0)
    for selection in NEW_SELECTIONS:
        got, want = run_pair(
            logits, embedding, splits=2, k=64, selection=selection, weighting="uniform",
            representative="first", top_p=0.9,
        )  # fmt: skip
        assert_same_step(got, want, embedding)


def test_philox_iid_noise_streams():
    seed = philox_step_seed(torch.Generator(device=DEVICE).manual_seed(0), DEVICE)
    sel, weight, token = philox_step_noise(seed, 3, 1001, 4)
    iid, iid_weight, iid_token = philox_step_noise(seed, 3, 1001, 4, draws=4)
    assert iid.shape == (3, 4, 1001)
    assert torch.equal(iid[:, 0], sel)  # draw 0 is the `sample` stream
    assert torch.equal(iid_weight, weight) and torch.equal(iid_token, token)
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(iid[:, a], iid[:, b])
    sample = iid.double().flatten()
    euler_gamma, var = 0.5772156649, math.pi**2 / 6
    assert abs(sample.mean().item() - euler_gamma) < 5 * math.sqrt(var / sample.numel())
    with pytest.raises(ValueError, match="draws"):
        philox_step_noise(seed, 3, 1001, 4, draws=0)


def test_explicit_iid_noise_through_the_public_function():
    logits, embedding = make_inputs(3, 1000, 16, seed=6, scale=1.0)
    spec = MixtureSpec(k=3, selection="iid", weighting="prob", representative="argmax")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    noise = StepNoise(selection=gumbel_noise((3, 3, 1000), device=DEVICE, generator=gen))
    got = mixture_step(logits, embedding, spec, noise=noise, backend="triton")
    want = mixture_step_ref(logits, embedding, spec, noise=noise)
    assert_same_step(got, want, embedding)
    with pytest.raises(ValueError, match=r"selection noise must have shape \(3, 3, 1000\)"):
        mixture_step(logits, embedding, spec, noise=StepNoise(selection=noise.selection[:, 0]))


def test_every_valid_spec_runs_on_the_triton_path(monkeypatch):
    for selection, weighting, representative in itertools.product(
        SELECTIONS, WEIGHTINGS, REPRESENTATIVES
    ):
        if (weighting, representative) == ("blend", "sample"):
            continue
        spec = MixtureSpec(
            k=64, selection=selection, weighting=weighting, representative=representative
        )
        assert triton_unsupported(spec) is None, spec
    assert "k <= 64" in triton_unsupported(MixtureSpec(k=65))
    # auto dispatch on CUDA (simulated) takes the Triton path for a new mode
    module = importlib.import_module("motg_fast.kernels.mixture_step")
    monkeypatch.setattr(module, "resolve_backend", lambda *args: "triton")
    logits, embedding = make_inputs(2, 300, 8, seed=16)
    spec = MixtureSpec(k=3, selection="sample_topk", weighting="blend", representative="first")
    got = mixture_step(logits, embedding, spec, generator=torch.Generator().manual_seed(1))
    direct = mixture_step_triton(
        logits, embedding, spec, generator=torch.Generator().manual_seed(1)
    )
    assert equal_steps(got, direct)


# ---------------------------------------------------------------- noise and seeding


def test_same_seed_same_sample_and_new_seed_new_sample():
    logits, embedding = make_inputs(4, 3001, 16, seed=1, scale=1.0)
    spec = MixtureSpec(k=3, selection="sample", weighting="gumbel")

    def step(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return mixture_step_triton(logits, embedding, spec, generator=gen)

    first, again, other = step(11), step(11), step(12)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.ids, other.ids)


def test_philox_noise_is_standard_gumbel_and_streams_differ():
    seed = philox_step_seed(torch.Generator(device=DEVICE).manual_seed(0), DEVICE)
    sel, weight, token = philox_step_noise(seed, 8, 4099, 64)
    assert sel.shape == (8, 4099) and weight.shape == token.shape == (8, 64)
    sample = sel.double().flatten()
    n = sample.numel()
    euler_gamma, var = 0.5772156649, math.pi**2 / 6
    assert abs(sample.mean().item() - euler_gamma) < 5 * math.sqrt(var / n)
    assert abs(sample.var().item() / var - 1) < 0.05
    assert len(set(sel[:, 0].tolist())) == 8  # rows are distinct streams
    assert not torch.equal(weight, token) and not torch.equal(sel[:, :64], weight)
    again = philox_step_noise(seed.clone(), 8, 4099, 64)
    assert all(torch.equal(a, b) for a, b in zip((sel, weight, token), again, strict=True))


def test_explicit_noise_replaces_philox():
    logits, embedding = make_inputs(3, 2000, 16, seed=6, scale=1.0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    noise = StepNoise(
        selection=gumbel_noise((3, 2000), device=DEVICE, generator=gen).to(torch.bfloat16),
        weight=gumbel_noise((3, 4), device=DEVICE, generator=gen),
        token=gumbel_noise((3, 4), device=DEVICE, generator=gen),
    )
    spec = MixtureSpec(k=4, selection="sample", weighting="gumbel")
    got = mixture_step_triton(logits, embedding, spec, noise=noise, vocab_splits=2)
    want = mixture_step_ref(logits, embedding, spec, noise=noise)
    assert_same_step(got, want, embedding)


# ------------------------------------------------------------ layouts, dtypes, paths


def test_noncontiguous_logits_and_embedding():
    logits, embedding = make_inputs(3, 2001, 24, seed=8)
    wide = torch.full((3, 2100), 7.0, device=DEVICE)  # row stride 2100 ≠ V
    wide[:, :2001] = logits
    transposed = logits.t().contiguous().t()  # column stride 3
    emb_t = embedding.t().contiguous().t()
    for view in (wide[:, :2001], transposed):
        got, want = run_pair(view, emb_t, k=3, selection="sample", weighting="gumbel")
        assert_same_step(got, want, embedding)


def test_fp16_logits_and_float64_embedding():
    logits, embedding = make_inputs(2, 1800, 16, seed=10, dtype=torch.float16)
    got, want = run_pair(logits, embedding, k=3, selection="sample")
    assert_same_step(got, want, embedding)
    emb64 = embedding.double()
    spec = MixtureSpec(k=3, representative="argmax")
    got64 = mixture_step_triton(logits, emb64, spec)
    want64 = mixture_step_ref(logits, emb64, spec)
    assert got64.embeds.dtype == torch.float64
    torch.testing.assert_close(got64.embeds, want64.embeds, atol=1e-6, rtol=1e-6)


def test_many_short_splits_and_a_multi_block_merge(monkeypatch):
    module = importlib.import_module("motg_fast.kernels.mixture_step")
    monkeypatch.setattr(module, "MERGE_TILE", 64)  # 4 splits per merge block
    logits, embedding = make_inputs(2, 200, 8, seed=12)
    logits[1, 100:] = float("-inf")
    # 16-column chunks: 13 splits (4 merge blocks), the last one holds 8 columns (< K_PAD)
    got, want = run_pair(logits, embedding, splits=64, block_v=16, k=16, selection="sample")
    assert_same_step(got, want, embedding)


def test_largest_k_and_the_k_limit():
    logits, embedding = make_inputs(2, 2500, 16, seed=15, scale=2.0)
    got, want = run_pair(logits, embedding, splits=2, k=64, top_p=0.9, weighting="gumbel")
    assert_same_step(got, want, embedding)
    with pytest.raises(ValueError, match="k <= 64"):
        mixture_step(logits, embedding, MixtureSpec(k=65), backend="triton")


def test_auto_dispatch_falls_back_to_the_reference_above_the_k_limit(monkeypatch):
    module = importlib.import_module("motg_fast.kernels.mixture_step")
    monkeypatch.setattr(module, "resolve_backend", lambda *args: "triton")  # as on CUDA
    monkeypatch.setattr(module, "mixture_step_triton", None)  # must not be called
    logits, embedding = make_inputs(2, 300, 8, seed=16)
    spec = MixtureSpec(k=65, representative="argmax")
    got = mixture_step(logits, embedding, spec)
    want = mixture_step_ref(logits, embedding, spec)
    assert equal_steps(got, want)


def test_tiny_vocabulary_with_k_equal_to_v():
    logits, embedding = make_inputs(2, 7, 4, seed=13)
    logits[0, 3] = float("-inf")
    got, want = run_pair(logits, embedding, k=7, weighting="gumbel")
    assert_same_step(got, want, embedding)


def test_split_count_heuristic():
    assert split_count(256, 151936, 132) == 1  # the batch fills the GPU: one program per row
    assert split_count(132, 151936, 132) == 1
    assert split_count(1, 151936, 132) == 151936 // 2048  # capped by MIN_SPLIT_COLUMNS
    assert split_count(64, 151936, 132) == 5  # ≈ 2 programs per SM
    assert split_count(1, 1000, 132) == 1  # too short to split
    counts = [split_count(b, 151936, 132) for b in range(1, 300)]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))  # fewer splits as B grows
    for vocab, splits, block in [(151936, 30, 1024), (3001, 3, 1024), (200, 64, 16), (7, 2, 16)]:
        n, chunk = split_plan(vocab, splits, block)
        assert chunk % block == 0 and n * chunk >= vocab > (n - 1) * chunk and n <= splits


def test_inverse_temperature_is_the_float32_reciprocal():
    # every path (the reference too) scales logits by these bits
    for tau in (0.9, 0.7, 1.3, 0.6, 1.0, 3.0, 1e-3, 0.123456789):
        one, t = torch.ones((), dtype=torch.float32), torch.tensor(tau, dtype=torch.float32)
        assert inverse_temperature(tau) == (one / t).item(), tau
    logits = torch.randn(4, 50)
    scaled, _, _ = full_distribution_stats(logits, 0.7)
    assert torch.equal(scaled, logits * torch.tensor(inverse_temperature(0.7)))


def test_public_dispatch_runs_the_triton_path():
    logits, embedding = make_inputs(2, 1500, 8, seed=14, scale=1.0)
    spec = MixtureSpec(k=2, selection="sample", temperature=0.9)
    public = mixture_step(
        logits, embedding, spec, backend="triton",
        generator=torch.Generator(device=DEVICE).manual_seed(5),
    )  # fmt: skip
    direct = mixture_step_triton(
        logits, embedding, spec, generator=torch.Generator(device=DEVICE).manual_seed(5)
    )
    for a, b in zip(public, direct, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="NaN"):
        bad = logits.clone()
        bad[1, 3] = float("nan")
        mixture_step(bad, embedding, spec, backend="triton")


def test_bad_arguments_fail_clearly():
    logits, embedding = make_inputs(2, 64, 4)
    with pytest.raises(ValueError, match="weight noise applies to weighting='gumbel' only"):
        mixture_step_triton(
            logits,
            embedding,
            MixtureSpec(k=2, weighting="dirichlet"),
            noise=StepNoise(weight=torch.zeros(2, 2)),
        )
    with pytest.raises(ValueError, match="vocab_splits"):
        mixture_step_triton(logits, embedding, MixtureSpec(k=2), vocab_splits=0)
    with pytest.raises(ValueError, match="block_v"):
        mixture_step_triton(logits, embedding, MixtureSpec(k=2), block_v=100)
    with pytest.raises(ValueError, match="seed"):
        philox_step_noise(torch.zeros(2, dtype=torch.int64), 1, 8, 2)


# ------------------------------------------------------------------ GPU, real shapes

GPU_VOCAB = 151936


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [("topk", "prob"), ("sample", "gumbel"), ("sample", "dirichlet")])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("hidden", [1536, 3584])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_gpu_real_shapes_match_reference(batch, hidden, k, mode):
    selection, weighting = mode
    logits, embedding = make_inputs(batch, GPU_VOCAB, hidden, dtype=torch.bfloat16, scale=2.0)
    embedding = embedding * 0.02
    logits[:, -200:] = float("-inf")  # padded vocabulary entries, as in Qwen2.5
    got, want = run_pair(
        logits, embedding, k=k, temperature=0.9, selection=selection, weighting=weighting,
        top_p=0.95,
    )  # fmt: skip
    assert_same_step(got, want, embedding, weight_atol=1e-4 if weighting == "dirichlet" else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 148])
def test_gpu_forced_paths_agree(splits):
    logits, embedding = make_inputs(8, GPU_VOCAB, 1536, dtype=torch.bfloat16)
    got, want = run_pair(logits, embedding, splits=splits, k=8, selection="sample")
    assert_same_step(got, want, embedding)


GPU_NEW_MODES = [
    ("iid", "uniform", "sample"),
    ("iid", "gumbel", "argmax"),
    ("sample_topk", "blend", "first"),
    ("sample_topk", "prob", "sample"),
    ("topk", "uniform", "first"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", GPU_NEW_MODES, ids="-".join)
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_gpu_new_modes_real_shapes_match_reference(batch, k, mode):
    selection, weighting, representative = mode
    logits, embedding = make_inputs(batch, GPU_VOCAB, 1536, dtype=torch.bfloat16, scale=2.0)
    embedding = embedding * 0.02
    logits[:, -200:] = float("-inf")  # padded vocabulary entries, as in Qwen2.5
    got, want = run_pair(
        logits, embedding, k=k, temperature=0.9, selection=selection, weighting=weighting,
        representative=representative, top_p=0.95,
    )  # fmt: skip
    assert_same_step(got, want, embedding)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 148])
@pytest.mark.parametrize("selection", NEW_SELECTIONS)
def test_gpu_new_selections_forced_paths_agree(selection, splits):
    logits, embedding = make_inputs(8, GPU_VOCAB, 1536, dtype=torch.bfloat16)
    settings = dict(k=8, selection=selection, weighting="uniform", representative="sample")
    got, want = run_pair(logits, embedding, splits=splits, **settings)
    assert_same_step(got, want, embedding)
    got, want = run_explicit(logits, embedding, splits=splits, **settings)
    assert_same_step(got, want, embedding)
