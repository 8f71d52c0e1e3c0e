"""`MixtureSpec`: validation, derived properties, and the deprecated keyword form of the ops."""

import dataclasses
import itertools
import warnings

import pytest
import torch

from motg_fast.kernels import (
    HAS_TRITON,
    SELECTIONS,
    WEIGHTINGS,
    MixtureSpec,
    StepNoise,
    action_logprob,
    gumbel_noise,
    mixture_step,
    token_slot,
    triton_interpreter_on,
)


def _batch(rows=4, vocab=23, hidden=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2, torch.randn(vocab, hidden, generator=g)


def _assert_same_step(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and torch.equal(x, y), name


# ------------------------------------------------------------ the deprecated keyword form

STEP_SETTINGS = [
    dict(k=3, selection="sample", weighting="dirichlet", temperature=0.8, concentration=2.0),
    dict(k=4, selection="sample", weighting="gumbel", top_p=0.9, gumbel_temperature=0.7),
    dict(k=2, representative="argmax", min_p=0.1),
    dict(k=1, selection="sample", temperature=1.3),
    dict(k=1),
]


@pytest.mark.parametrize("settings", STEP_SETTINGS, ids=str)
def test_deprecated_mixture_step_keywords_warn_and_match_the_spec_form(settings):
    logits, embedding = _batch()
    new = mixture_step(
        logits, embedding, MixtureSpec(**settings), generator=torch.Generator().manual_seed(3)
    )
    with pytest.warns(DeprecationWarning, match=r"mixture_step\(\.\.\., k=\.\.\.") as record:
        old = mixture_step(
            logits, embedding, generator=torch.Generator().manual_seed(3), **settings
        )
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    _assert_same_step(old, new)


def test_deprecated_noise_keywords_match_step_noise():
    logits, embedding = _batch()
    g = torch.Generator().manual_seed(0)
    noise = StepNoise(
        selection=gumbel_noise((4, 23), device=logits.device, generator=g),
        weight=gumbel_noise((4, 3), device=logits.device, generator=g),
        token=gumbel_noise((4, 3), device=logits.device, generator=g),
    )
    settings = dict(k=3, selection="sample", weighting="gumbel")
    new = mixture_step(logits, embedding, MixtureSpec(**settings), noise=noise)
    with pytest.warns(DeprecationWarning):
        old = mixture_step(
            logits,
            embedding,
            selection_noise=noise.selection,
            weight_noise=noise.weight,
            token_noise=noise.token,
            **settings,
        )
    _assert_same_step(old, new)


@pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="needs triton with CUDA or the interpreter (TRITON_INTERPRET=1)",
)
def test_deprecated_keywords_on_the_triton_path():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, embedding = (t.to(device) for t in _batch(rows=2, vocab=64))
    settings = dict(k=2, selection="sample", weighting="gumbel", temperature=0.9)

    def gen():
        return torch.Generator(device=device).manual_seed(5)

    new = mixture_step(
        logits, embedding, MixtureSpec(**settings), generator=gen(), backend="triton"
    )
    with pytest.warns(DeprecationWarning):
        old = mixture_step(logits, embedding, generator=gen(), backend="triton", **settings)
    _assert_same_step(old, new)


def _stored_action(spec, seed=0):
    """`(args, keywords)` of `action_logprob` for one step's actions."""
    logits, embedding = _batch(rows=6, seed=seed)
    step = mixture_step(logits, embedding, spec, generator=torch.Generator().manual_seed(seed))
    args = (step.logprobs.double(), step.mask, token_slot(step.ids, step.token))
    rest = None if step.rest_logprob is None else step.rest_logprob.double()
    return args, dict(weight_logits=step.weight_logits, rest_logprob=rest)


@pytest.mark.parametrize(
    ("selection", "weighting"), list(itertools.product(SELECTIONS, WEIGHTINGS))
)
@pytest.mark.parametrize("representative", ["sample", "argmax"])
def test_deprecated_action_logprob_keywords_warn_and_match_the_spec_form(
    selection, weighting, representative
):
    settings = dict(
        selection=selection,
        weighting=weighting,
        representative=representative,
        concentration=0.8,
        gumbel_temperature=0.6,
    )
    if weighting == "blend" and representative == "sample":
        return  # Mixture of Inputs feeds back slot 0 (refused, tested elsewhere)
    spec = MixtureSpec(k=3, **settings)
    action, stored = _stored_action(spec)
    for likelihood in spec.likelihoods:
        new = action_logprob(*action, spec, likelihood=likelihood, **stored)
        with pytest.warns(DeprecationWarning, match=r"action_logprob\(\.\.\.") as record:
            old = action_logprob(*action, likelihood=likelihood, **stored, **settings)
        assert len(record) == 1 and record[0].filename == __file__
        assert torch.equal(old, new), likelihood


def test_the_spec_form_does_not_warn():
    logits, embedding = _batch()
    spec = MixtureSpec(k=2, selection="sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        step = mixture_step(logits, embedding, spec, noise=StepNoise(), generator=None)
        action_logprob(
            step.logprobs,
            step.mask,
            token_slot(step.ids, step.token),
            spec,
            likelihood="exact",
            weight_logits=step.weight_logits,
            rest_logprob=step.rest_logprob,
        )


def test_a_spec_and_old_keywords_together_are_a_type_error():
    logits, embedding = _batch()
    spec = MixtureSpec(k=2)
    with pytest.raises(TypeError, match=r"not both: \['k'\]"):
        mixture_step(logits, embedding, spec, k=2)
    with pytest.raises(TypeError, match=r"not both: \['selection', 'temperature'\]"):
        mixture_step(logits, embedding, spec, temperature=0.5, selection="sample")
    with pytest.raises(TypeError, match=r"not both: \['selection_noise'\]"):
        mixture_step(logits, embedding, spec, selection_noise=torch.zeros(4, 23))
    with pytest.raises(TypeError, match=r"not both: \['token_noise'\]"):
        mixture_step(logits, embedding, k=2, noise=StepNoise(), token_noise=torch.zeros(4, 2))
    action, stored = _stored_action(MixtureSpec(k=2, selection="sample"))
    with pytest.raises(TypeError, match=r"not both: \['selection'\]"):
        action_logprob(*action, spec, likelihood="token", selection="sample", **stored)


def test_missing_or_wrong_spec_is_a_type_error():
    logits, embedding = _batch()
    with pytest.raises(TypeError, match="needs a MixtureSpec"):
        mixture_step(logits, embedding)
    with pytest.raises(TypeError, match="spec must be a MixtureSpec, got dict"):
        mixture_step(logits, embedding, {"k": 2})
    with pytest.raises(TypeError, match="needs a MixtureSpec"):
        action_logprob(*_stored_action(MixtureSpec(k=2))[0], likelihood="token")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "filters", [{"top_p": 0.9}, {"top_p": 1.0}, {"min_p": 0.1}, {"top_p": 0.5, "min_p": 0.2}]
)
def test_filters_with_k1_are_a_one_line_error(filters):
    with pytest.raises(ValueError, match="top_p and min_p filter the k mixture slots") as info:
        MixtureSpec(k=1, **filters)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="use k >= 2"):
        MixtureSpec(k=2).replace(k=1, **filters)
    with pytest.raises(ValueError, match="top_p and min_p"), pytest.warns(DeprecationWarning):
        mixture_step(*_batch(), k=1, **filters)  # the deprecated form applies the same rule
    assert MixtureSpec(k=2, **filters).has_filters


def test_zero_min_p_is_no_filter_and_allowed_with_k1():
    spec = MixtureSpec(k=1, min_p=0.0)
    assert not spec.has_filters and not MixtureSpec(k=1).has_filters


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": True}, "k must be an integer >= 1"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"selection": "nucleus"}, "unknown selection 'nucleus'"),
        ({"weighting": "average"}, "unknown weighting 'average'"),
        ({"representative": "last"}, "unknown representative 'last'"),
        ({"k": 2, "top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"k": 2, "min_p": -0.1}, r"min_p must lie in \[0, 1\]"),
        ({"concentration": -1.0}, "concentration must be a finite number > 0"),
        ({"gumbel_temperature": 0}, "gumbel_temperature must be a finite number > 0"),
    ],
)
def test_bad_fields_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message) as info:
        MixtureSpec(**fields)
    assert "\n" not in str(info.value)


def test_spec_is_frozen_and_replace_validates():
    spec = MixtureSpec(k=2, temperature=0.7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.k = 3
    assert spec.replace(k=4) == MixtureSpec(k=4, temperature=0.7) and spec.k == 2
    with pytest.raises(ValueError, match="temperature must be"):
        spec.replace(temperature=0.0)
    assert hash(spec) == hash(MixtureSpec(k=2, temperature=0.7))


def test_dict_round_trip():
    spec = MixtureSpec(k=3, selection="sample", weighting="gumbel", top_p=0.8)
    assert MixtureSpec.from_mapping(spec.to_dict()) == spec
    assert MixtureSpec.from_mapping({"k": 2, "other": 1}) == MixtureSpec(k=2)
    assert MixtureSpec.field_names()[0] == "k" and len(MixtureSpec.field_names()) == 17


# ------------------------------------------------------------------ derived properties


@pytest.mark.parametrize(
    ("fields", "deterministic", "draws"),
    [
        ({"k": 1}, True, True),  # greedy: the token of the one slot is still drawn
        ({"k": 1, "representative": "argmax"}, True, False),
        ({"k": 3, "representative": "argmax"}, True, False),  # top-k + p̃ + heaviest slot
        ({"k": 3}, False, True),  # y ~ Cat(p̃)
        ({"k": 1, "selection": "sample"}, False, True),  # multinomial sampling
        ({"k": 3, "selection": "sample", "representative": "argmax"}, False, True),
        ({"k": 3, "weighting": "dirichlet", "representative": "argmax"}, False, True),
        ({"k": 3, "weighting": "gumbel", "representative": "argmax"}, False, True),
    ],
)
def test_is_deterministic_and_needs_noise(fields, deterministic, draws):
    spec = MixtureSpec(**fields)
    assert spec.is_deterministic is deterministic
    assert spec.needs_noise is draws
    assert spec.is_discrete is (spec.k == 1)


def test_needs_noise_says_whether_the_generator_advances():
    logits, embedding = torch.randn(2, 20), torch.randn(20, 4)
    for spec in (MixtureSpec(k=1), MixtureSpec(k=2, representative="argmax")):
        gen = torch.Generator().manual_seed(0)
        mixture_step(logits, embedding, spec, generator=gen)
        moved = not torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
        assert moved is spec.needs_noise, spec


def test_unknown_keywords_are_named():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foo'\]"):
        mixture_step(torch.randn(2, 20), torch.randn(20, 4), MixtureSpec(), foo=1)


@pytest.mark.parametrize(
    ("selection", "weighting", "representative"),
    list(itertools.product(SELECTIONS, WEIGHTINGS, ["sample", "argmax", "first"])),
)
def test_likelihoods_and_check_likelihood(selection, weighting, representative):
    if weighting == "blend" and representative == "sample":
        with pytest.raises(ValueError, match="representative='first'"):
            MixtureSpec(k=2, weighting=weighting, representative=representative)
        return
    spec = MixtureSpec(k=2, selection=selection, weighting=weighting, representative=representative)
    no_random_part = (
        selection == "topk"
        and weighting in ("prob", "uniform", "blend")
        and representative != "sample"
    )
    want = ("token", "weighted") if no_random_part else ("token", "weighted", "exact")
    if weighting == "gumbel":
        want += ("clamped_gumbel",)
    assert spec.likelihoods == want
    for likelihood in spec.likelihoods:
        spec.check_likelihood(likelihood)
    if no_random_part:
        with pytest.raises(ValueError, match="likelihood='exact' is undefined") as info:
            spec.check_likelihood("exact")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown likelihood 'exactly'"):
        spec.check_likelihood("exactly")


def test_answer_spec_of_a_mixture_run_samples_one_token_at_the_same_temperature():
    spec = MixtureSpec(
        k=4,
        temperature=0.7,
        selection="topk",
        weighting="dirichlet",
        top_p=0.9,
        min_p=0.05,
        concentration=3.0,
        gumbel_temperature=0.5,
        representative="sample",
    )
    answer = spec.answer_spec()
    assert answer == MixtureSpec(k=1, temperature=0.7, selection="sample", representative="argmax")
    assert answer.is_discrete and not answer.has_filters and answer.weighting == "prob"
    assert answer.needs_noise  # a multinomial draw
    assert answer.answer_spec() is answer


@pytest.mark.parametrize("fields", [{}, {"selection": "sample"}, {"temperature": 0.5}])
def test_answer_spec_of_a_discrete_run_is_the_spec_itself(fields):
    spec = MixtureSpec(k=1, **fields)
    assert spec.answer_spec() is spec


def test_answer_spec_step_is_a_full_distribution_sample():
    # the answer step of a top-k mixture run can emit a token outside the top k
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 1.6]])
    answer = MixtureSpec(k=2, temperature=1.0).answer_spec()
    step = mixture_step(
        logits.expand(4000, 5), torch.eye(5), answer, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(step.token, minlength=5).double() / 4000
    assert torch.allclose(counts, torch.softmax(logits[0].double(), -1), atol=0.03)
