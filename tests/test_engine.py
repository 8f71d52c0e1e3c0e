"""Rollout engine vs transformers: greedy parity with `generate`, cached logits vs a full
forward, shared vs per-row prefill, phases and stops, every MoT-G mode, bad input."""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import DynamicCache

from motg_fast.kernels import MixtureSpec, mixture_embed
from motg_fast.rollout.cache import PreallocatedCache
from motg_fast.rollout.engine import RolloutEngine
from motg_fast.rollout.marker import MarkerMatcher, build_marker_table
from motg_fast.testing import THINK_END, SteeredLM, tiny_llama, tiny_qwen2, tiny_tokenizer
from motg_fast.types import Phase, Trajectories

PROMPT_TEXTS = ["the answer <think>", "a <think>", "is the answer is on <think>"]
# fp32 tolerance between the engine's cached decode logits and one full forward (SDPA over
# a preallocated cache vs over the whole sequence: different summation order only).
LOGITS_ATOL, LOGITS_RTOL = 5e-5, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(text) for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def qwen2():
    return tiny_qwen2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def steered(model, tokenizer, prompts, *, marker_at: int, eos_at: int | None, decoy_at=None):
    """`model` forced to write the marker's tokens from completion index `marker_at` of the
    longest prompt (absolute positions, so shorter prompts get it later), EOS at `eos_at`,
    and a lone "</" (a marker prefix that must not switch phases) at `decoy_at`."""
    width = max(len(p) for p in prompts)
    marker = tokenizer.encode(THINK_END)
    forced = {width + marker_at + i: token for i, token in enumerate(marker)}
    if eos_at is not None:
        forced[width + eos_at] = tokenizer.eos_token_id
    if decoy_at is not None:
        forced[width + decoy_at] = marker[0]
    return SteeredLM(model, forced, suppressed=(tokenizer.eos_token_id,))


def hf_greedy(model, prompts, group_size, max_new_tokens, eos, pad):
    """`model.generate(do_sample=False)` on the prompts repeated G times, left padded."""
    rows = [p for p in prompts for _ in range(group_size)]
    width = max(len(p) for p in rows)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return out[:, width:]


def check_valid(rollout: Trajectories, k: int, eos_ids=()):
    """Invariants every rollout meets (shapes, mask rules, weights, phases, stop reasons)."""
    n, t = rollout.token.shape
    assert rollout.ids.shape == rollout.weights.shape == rollout.mask.shape == (n, t, k)
    assert rollout.ids.dtype == torch.int64 and rollout.weights.dtype == torch.float32
    assert rollout.phase.dtype == torch.int8 and rollout.logprobs.shape == (n, t, k)
    done = rollout.completion_mask
    assert torch.equal(done.sum(1), rollout.lengths)
    assert torch.equal(done, torch.arange(t) < rollout.lengths.unsqueeze(1))  # a prefix
    w, m = rollout.weights[done], rollout.mask[done]
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-5)
    assert (w >= 0).all() and (w[~m] == 0).all() and m[:, 0].all()
    slot = rollout.token_slot[done]
    assert torch.equal(rollout.ids[done].gather(-1, slot[:, None]).squeeze(-1), rollout.token[done])
    assert m.gather(-1, slot[:, None]).all()
    assert torch.isfinite(rollout.logprobs[done][m]).all()
    assert (rollout.logprobs[done][m] <= 0).all()
    phase = rollout.phase
    assert ((phase == Phase.PAD) == ~done).all()
    # phases never go back from discrete to thinking
    assert (phase[:, 1:][done[:, 1:]] >= phase[:, :-1][done[:, 1:]]).all()
    discrete = phase == Phase.DISCRETE
    if k > 1 and discrete.any():
        first = torch.zeros(k, dtype=torch.bool)
        first[0] = True
        assert (rollout.mask[discrete] == first).all()
        assert (rollout.weights[discrete] == first.float()).all()
        assert (rollout.ids[discrete] == rollout.token[discrete][:, None]).all()
        assert (rollout.token_slot[discrete] == 0).all()
    # past the end: nothing
    assert (rollout.ids[~done] == 0).all() and (rollout.weights[~done] == 0).all()
    assert not rollout.mask[~done].any() and (rollout.token[~done] == 0).all()
    for row, reason in enumerate(rollout.stop_reasons):
        last = int(rollout.token[row, rollout.lengths[row] - 1])
        assert reason == ("eos" if last in eos_ids else "length")
    assert len(rollout.texts) == len(rollout.prompt_ids) == n


# --------------------------------------------------------------------------------------
# The tiny fixtures themselves
# --------------------------------------------------------------------------------------


def test_marker_spans_several_tokens(tokenizer):
    ids = tokenizer.encode(THINK_END)
    assert len(ids) == 3
    assert tokenizer.decode(ids) == THINK_END
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


# --------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama], ids=["qwen2", "llama"])
def test_greedy_matches_generate(build, tokenizer, prompts, request):
    """k = 1 `topk` is token-for-token `generate(do_sample=False)`, EOS stops included."""
    model = request.getfixturevalue("qwen2" if build is tiny_qwen2 else "llama")
    steps, group = 16, 2
    pad = tokenizer.pad_token_id
    free = RolloutEngine(model, tokenizer, max_new_tokens=steps, eos_token_ids=[])
    first = free.generate(prompts, group_size=group)
    # an EOS id that some row emits mid-way, so both stop reasons occur
    eos = int(first.token[0, steps // 2])
    expected = hf_greedy(model, prompts, group, steps, eos, pad)

    engine = RolloutEngine(model, tokenizer, max_new_tokens=steps, eos_token_ids=[eos])
    rollout = engine.generate(prompts, MixtureSpec(k=1, selection="topk"), group_size=group)
    check_valid(rollout, 1, eos_ids=[eos])
    assert "eos" in rollout.stop_reasons
    for row in range(len(rollout.token)):
        length = int(rollout.lengths[row])
        assert rollout.token[row, :length].tolist() == expected[row, :length].tolist()
        assert (expected[row, length:] == pad).all()  # generate stopped there too
    assert rollout.group.tolist() == [n // group for n in range(len(prompts) * group)]


def test_logits_match_full_forward(qwen2, tokenizer, prompts):
    """Every step's logits equal one non-cached forward over the same input embeddings
    (prompt tokens, then each position's Σ w E[ids]), in both phases."""
    model = steered(qwen2, tokenizer, prompts, marker_at=2, eos_at=9)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=12)
    rollout = engine.generate(
        prompts,
        MixtureSpec(k=3, selection="sample", weighting="dirichlet", temperature=0.8),
        group_size=2,
        seed=0,
        return_logits=True,
    )
    check_valid(rollout, 3, eos_ids=[tokenizer.eos_token_id])
    assert (rollout.phase == Phase.DISCRETE).any()
    embedding = qwen2.get_input_embeddings().weight
    for row, prompt in enumerate(rollout.prompt_ids):
        length = int(rollout.lengths[row])
        actions = mixture_embed(
            embedding, rollout.ids[row, : length - 1], rollout.weights[row, : length - 1]
        )
        inputs = torch.cat([embedding[torch.tensor(prompt)], actions])
        with torch.no_grad():
            positions = torch.arange(inputs.shape[0]).unsqueeze(0)
            full = model(inputs_embeds=inputs.unsqueeze(0), position_ids=positions).logits[0]
        want = full[len(prompt) - 1 : len(prompt) - 1 + length]
        torch.testing.assert_close(
            rollout.logits[row, :length], want, atol=LOGITS_ATOL, rtol=LOGITS_RTOL
        )
        # the stored log-probs are log softmax(z/τ) at the ids of those logits
        logp = torch.log_softmax(rollout.logits[row, :length] / 0.8, -1)
        torch.testing.assert_close(
            rollout.logprobs[row, :length], logp.gather(-1, rollout.ids[row, :length])
        )


def test_shared_prefill_matches_per_row_prefill(qwen2, tokenizer, prompts):
    engine = RolloutEngine(qwen2, tokenizer, max_new_tokens=10)
    spec = MixtureSpec(k=2, selection="sample", weighting="gumbel")
    shared = engine.generate(prompts, spec, group_size=3, seed=3)
    per_row = engine.generate(prompts, spec, group_size=3, seed=3, share_prefill=False)
    assert shared.stats["prefill_rows"] == len(prompts)
    assert per_row.stats["prefill_rows"] == 3 * len(prompts)
    assert torch.equal(shared.ids, per_row.ids)
    assert torch.equal(shared.token, per_row.token)
    torch.testing.assert_close(shared.weights, per_row.weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Phases and stops
# --------------------------------------------------------------------------------------


def test_phase_switch_after_multi_token_marker(qwen2, tokenizer, prompts):
    model = steered(qwen2, tokenizer, prompts, marker_at=4, eos_at=10, decoy_at=1)
    widths = [max(len(p) for p in prompts) - len(p) for p in prompts]  # extra offset per prompt
    steps = 10 + max(widths)  # the shortest prompt's rows reach the limit before their EOS
    engine = RolloutEngine(model, tokenizer, max_new_tokens=steps)
    rollout = engine.generate(
        prompts, MixtureSpec(k=2, weighting="dirichlet"), group_size=2, seed=1
    )
    check_valid(rollout, 2, eos_ids=[tokenizer.eos_token_id])
    marker = tokenizer.encode(THINK_END)
    for row in range(len(rollout.token)):
        offset = widths[row // 2]
        end = 4 + offset + len(marker)  # first discrete position
        tokens = rollout.token[row].tolist()
        assert tokens[end - len(marker) : end] == marker
        assert tokens[1 + offset] == marker[0]  # the decoy "</" did not switch
        assert (rollout.phase[row, :end] == Phase.MIXTURE).all()
        length = int(rollout.lengths[row])
        assert (rollout.phase[row, end:length] == Phase.DISCRETE).all()
        assert THINK_END in rollout.texts[row]
        if 10 + offset < steps:
            assert rollout.stop_reasons[row] == "eos" and length == 11 + offset
            assert tokens[length - 1] == tokenizer.eos_token_id
        else:
            assert rollout.stop_reasons[row] == "length" and length == steps
    assert set(rollout.stop_reasons) == {"eos", "length"}
    assert rollout.stats["compactions"] >= 1


def test_marker_detected_in_any_tokenization(qwen2, tokenizer, prompts):
    """The tokens `<`, `/`, `think`, `>` are not the marker's encoding but decode to it."""
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in ["<", "/", "think", ">"]]
    assert pieces != tokenizer.encode(THINK_END)
    width = max(len(p) for p in prompts)
    model = SteeredLM(qwen2, {width + 2 + i: token for i, token in enumerate(pieces)})
    engine = RolloutEngine(model, tokenizer, max_new_tokens=9, eos_token_ids=[])
    rollout = engine.generate(prompts[-1:], MixtureSpec(k=2))
    assert rollout.token[0, 2:6].tolist() == pieces
    assert (rollout.phase[0, :6] == Phase.MIXTURE).all()
    assert (rollout.phase[0, 6:] == Phase.DISCRETE).all()


def test_discrete_run_stays_greedy_after_marker(qwen2, tokenizer, prompts):
    model = steered(qwen2, tokenizer, prompts, marker_at=1, eos_at=None)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=8)
    rollout = engine.generate(prompts, MixtureSpec(k=1), group_size=2, return_logits=True)
    check_valid(rollout, 1)
    assert (rollout.phase == Phase.DISCRETE).sum() > 0
    assert torch.equal(rollout.token, rollout.logits.argmax(-1))


def test_no_marker_keeps_every_row_thinking(qwen2, tokenizer, prompts):
    model = steered(qwen2, tokenizer, prompts, marker_at=1, eos_at=None)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=6, think_end=None, eos_token_ids=[])
    rollout = engine.generate(prompts, MixtureSpec(k=2), progress=True)
    assert (rollout.phase == Phase.MIXTURE).all()


def test_compaction_leaves_trajectories_unchanged(qwen2, tokenizer, prompts):
    """Finished rows leave the batch (fewer forward rows) without changing any trajectory."""
    model = steered(qwen2, tokenizer, prompts, marker_at=1, eos_at=5)
    steps = 12
    runs = {
        fraction: RolloutEngine(
            model, tokenizer, max_new_tokens=steps, compact_fraction=fraction
        ).generate(prompts, group_size=2)
        for fraction in (None, 0.1)
    }
    kept, compacted = runs[None], runs[0.1]
    assert kept.stats["compactions"] == 0 and compacted.stats["compactions"] >= 1
    assert compacted.stats["forward_rows"] < kept.stats["forward_rows"]
    for name in ("ids", "weights", "mask", "token", "phase", "completion_mask", "lengths"):
        assert torch.equal(getattr(kept, name), getattr(compacted, name)), name
    torch.testing.assert_close(kept.logprobs, compacted.logprobs)
    check_valid(compacted, 1, eos_ids=[tokenizer.eos_token_id])


def test_sparse_syncs_give_the_same_greedy_rollout(qwen2, tokenizer, prompts):
    """Syncing every 3 steps (the CUDA default is 8) changes nothing for a greedy run, and
    a mixture run keeps the phase rules although phases are only known on the device."""
    model = steered(qwen2, tokenizer, prompts, marker_at=1, eos_at=5)
    every_step = RolloutEngine(model, tokenizer, max_new_tokens=12, sync_every=1)
    sparse = RolloutEngine(model, tokenizer, max_new_tokens=12, sync_every=3)
    expected = every_step.generate(prompts, group_size=2)
    got = sparse.generate(prompts, group_size=2)
    for name in ("ids", "token", "phase", "lengths"):
        assert torch.equal(getattr(expected, name), getattr(got, name)), name
    mixed = sparse.generate(prompts, MixtureSpec(k=3, weighting="gumbel"), group_size=2, seed=2)
    check_valid(mixed, 3, eos_ids=[tokenizer.eos_token_id])
    assert torch.equal(mixed.phase, expected.phase)  # same forced marker and EOS positions


# --------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------

MODES = [
    dict(selection=s, weighting=w)
    for s in ("topk", "sample")
    for w in ("prob", "dirichlet", "gumbel")
] + [
    dict(selection="sample", weighting="prob", top_p=0.5, min_p=0.2),
    dict(selection="topk", weighting="dirichlet", concentration=0.5, representative="argmax"),
    dict(selection="sample", weighting="gumbel", gumbel_temperature=0.3, temperature=0.7),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_every_mode_gives_valid_reproducible_trajectories(mode, qwen2, tokenizer, prompts):
    model = steered(qwen2, tokenizer, prompts, marker_at=1, eos_at=6)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=8)
    k = 3
    first = engine.generate(prompts, MixtureSpec(k=k, **mode), group_size=2, seed=11)
    check_valid(first, k, eos_ids=[tokenizer.eos_token_id])
    assert (first.phase == Phase.MIXTURE).any() and (first.phase == Phase.DISCRETE).any()
    thinking = first.phase == Phase.MIXTURE
    ids = first.ids[thinking]
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()  # distinct candidates
    again = engine.generate(prompts, MixtureSpec(k=k, **mode), group_size=2, seed=11)
    for name in ("ids", "weights", "mask", "token", "logprobs", "phase"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    other = engine.generate(prompts, MixtureSpec(k=k, **mode), group_size=2, seed=12)
    assert not torch.equal(first.token, other.token)  # the discrete phase samples


def test_sampled_discrete_mode(qwen2, tokenizer, prompts):
    engine = RolloutEngine(qwen2, tokenizer, max_new_tokens=6, eos_token_ids=[])
    a = engine.generate(prompts, MixtureSpec(k=1, selection="sample"), group_size=4, seed=5)
    b = engine.generate(prompts, MixtureSpec(k=1, selection="sample"), group_size=4, seed=5)
    check_valid(a, 1)
    assert torch.equal(a.token, b.token)
    assert len({tuple(row) for row in a.token.tolist()}) > len(prompts)  # rows differ


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's interpreter",
)
def test_triton_step_path(qwen2, tokenizer, prompts):
    """The engine on the Triton step kernel (interpreter on a CPU): greedy equals the
    reference path, and a sampled MoT-G run with a phase switch is valid."""
    model = steered(qwen2, tokenizer, prompts[:2], marker_at=1, eos_at=5)
    reference = RolloutEngine(model, tokenizer, max_new_tokens=6, backend="reference")
    triton = RolloutEngine(model, tokenizer, max_new_tokens=6, backend="triton")
    greedy = triton.generate(prompts[:2], group_size=2)
    assert torch.equal(greedy.token, reference.generate(prompts[:2], group_size=2).token)
    mixed = triton.generate(prompts[:2], MixtureSpec(k=2, selection="sample"), group_size=2, seed=0)
    check_valid(mixed, 2, eos_ids=[tokenizer.eos_token_id])
    assert (mixed.phase == Phase.DISCRETE).any()


@pytest.mark.gpu
def test_cuda_rollouts(tokenizer, prompts):
    """On CUDA: fp32 greedy parity with `generate`, and a valid bf16 MoT-G rollout."""
    model = tiny_qwen2().cuda()
    steps, eos, pad = 12, tokenizer.eos_token_id, tokenizer.pad_token_id
    expected = hf_greedy(model, prompts, 2, steps, eos, pad).cpu()
    engine = RolloutEngine(model, tokenizer, max_new_tokens=steps)
    rollout = engine.generate(prompts, group_size=2)
    for row in range(len(rollout.token)):
        length = int(rollout.lengths[row])
        assert rollout.token[row, :length].tolist() == expected[row, :length].tolist()
    model = model.to(torch.bfloat16)
    engine = RolloutEngine(steered(model, tokenizer, prompts, marker_at=1, eos_at=5), tokenizer)
    mixed = engine.generate(
        prompts, MixtureSpec(k=2, weighting="dirichlet"), group_size=3, max_new_tokens=10, seed=0
    )
    cpu = Trajectories(**{
        name: value.cpu() if isinstance(value, torch.Tensor) else value
        for name, value in vars(mixed).items()
    })  # fmt: skip
    check_valid(cpu, 2, eos_ids=[eos])
    assert (cpu.phase == Phase.DISCRETE).any()


# --------------------------------------------------------------------------------------
# The marker automaton and the cache
# --------------------------------------------------------------------------------------


def test_marker_automaton_matches_substring_search():
    marker = "</think>"
    pieces = ["<", "/", "</", "th", "think", "ink", ">", ">\n", "k>", "x", "", "</th", "a<", "<<"]
    texts = list(dict.fromkeys(pieces))
    matcher = MarkerMatcher(marker, texts, torch.device("cpu"))
    rng = random.Random(0)
    for _ in range(300):
        sequence = [rng.randrange(len(texts)) for _ in range(rng.randrange(1, 12))]
        state = matcher.start(1)
        text = ""
        for step, token in enumerate(sequence):
            state = matcher.advance(state, torch.tensor([token]))
            text += texts[token]
            assert bool(matcher.matched(state)) == (marker in text), (sequence[: step + 1], text)


def test_marker_table_of_repetitive_marker():
    """A marker with self-overlap ("abab") falls back to the right partial match."""
    table = build_marker_table("abab", ["a", "b", "aba", "c", "bab"])
    a, b, aba, c, bab = range(5)
    state = 0
    for token in (a, b, a, a, b, a):  # "abaaba": not yet
        state = int(table[state, token])
    assert state == 3  # ends with "aba"
    assert int(table[state, b]) == 4 and int(table[3, bab]) == 4 and int(table[2, c]) == 0
    assert int(table[1, bab]) == 4  # "a" + "bab"


def test_preallocated_cache_matches_dynamic_cache(qwen2):
    """Prefill + shared prefix + decode + compaction give DynamicCache's keys and values."""
    ids = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = PreallocatedCache(qwen2.config, rows=6, capacity=7, group_size=3)
    reference = DynamicCache(config=qwen2.config)
    with torch.no_grad():
        qwen2(input_ids=ids, past_key_values=cache, use_cache=True)
        qwen2(input_ids=ids.repeat_interleave(3, 0), past_key_values=reference, use_cache=True)
        cache.share_prefix()
        step = torch.randint(0, 250, (6, 1), generator=torch.Generator().manual_seed(1))
        qwen2(input_ids=step, past_key_values=cache, use_cache=True)
        qwen2(input_ids=step, past_key_values=reference, use_cache=True)
    storage = cache.layers[0].keys.data_ptr()
    keep = torch.tensor([1, 4, 5])
    cache.keep_rows(keep)
    reference.batch_select_indices(keep)
    assert cache.length == 6 and cache.layers[0].keys.data_ptr() == storage
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys[:, :, :6], theirs.keys, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.values[:, :, :6], theirs.values, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_ids=[]), "prompt_ids is empty"),
        (dict(prompt_ids=[[5, 6], []]), "prompt 1 is empty"),
        (dict(prompt_ids=[[5] * 300]), "more than the model's context"),
        (dict(prompt_ids=[[5] * 200], max_new_tokens=100), "plus max_new_tokens=100 exceeds"),
        (dict(prompt_ids=[[5, 999]]), "outside the vocabulary"),
        (dict(group_size=0), "group_size must be"),
        (dict(k=301), "k=301 exceeds the vocabulary size 300"),
        (dict(k=0), "k must be"),
        (dict(selection="nucleus"), "unknown selection 'nucleus'"),
        (dict(weighting="max"), "unknown weighting 'max'"),
        (dict(representative="mean"), "unknown representative 'mean'"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(top_p=1.5), "top_p must lie"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
    ],
)
def test_bad_input_raises(kwargs, match, qwen2, tokenizer):
    engine = RolloutEngine(qwen2, tokenizer, max_new_tokens=4)
    kwargs = {"prompt_ids": [[5, 6, 7]], **kwargs}
    spec_fields = {name: kwargs.pop(name) for name in MixtureSpec.field_names() if name in kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate(spec=MixtureSpec(**spec_fields), **kwargs)


def test_bad_engine_settings(qwen2, tokenizer):
    with pytest.raises(ValueError, match="eos token ids"):
        RolloutEngine(qwen2, tokenizer, eos_token_ids=[400])
    with pytest.raises(ValueError, match="compact_fraction"):
        RolloutEngine(qwen2, tokenizer, compact_fraction=0.0)
    with pytest.raises(ValueError, match="sync_every"):
        RolloutEngine(qwen2, tokenizer, sync_every=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutEngine(qwen2, tokenizer, max_new_tokens=-1)
