"""Training forward vs transformers: inputs rebuilt from actions, log-likelihoods per position."""

import contextlib

import pytest
import torch
import transformers

from motg_fast.kernels import MixtureSpec, action_logprob
from motg_fast.training.policy import build_sequence_batch, score_trajectories
from motg_fast.training.shared_prompt import can_share_prompt
from motg_fast.types import Phase, Trajectories

VOCAB, K = 97, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def _trajectories(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    n, t = 3, 5
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(n * t)]).view(n, t, K)
    weights = torch.softmax(torch.randn(n, t, K, generator=g), -1)
    mask = torch.ones(n, t, K, dtype=torch.bool)
    phase = torch.full((n, t), Phase.MIXTURE, dtype=torch.int8)
    phase[0, 3:] = Phase.DISCRETE
    phase[1, 2:] = Phase.PAD  # a shorter completion
    for row, col in ((0, 3), (0, 4)):  # discrete positions: [y, …], w = [1, 0, …]
        weights[row, col] = torch.tensor([1.0, 0.0, 0.0])
        mask[row, col] = torch.tensor([True, False, False])
    mask[2, 1, 2] = False
    weights[2, 1] = torch.tensor([0.7, 0.3, 0.0])
    token_slot = torch.zeros(n, t, dtype=torch.long)
    token_slot[2, 2] = 1
    return Trajectories(
        prompts, ids, weights.log(), mask, token_slot, phase, torch.zeros(n, t, K)
    )  # weight logits: the log-weights


def _naive_logprobs(model, traj, temperature):
    """Per trajectory, unpadded: explicit weighted sums, full logits, log-softmax."""
    emb = model.get_input_embeddings().weight
    out = torch.zeros(traj.ids.shape)
    for n, prompt in enumerate(traj.prompt_ids):
        length = int(traj.completion_mask[n].sum())
        inputs = [emb[i] for i in prompt]
        for t in range(length - 1):
            inputs.append((traj.weights[n, t, :, None] * emb[traj.ids[n, t]]).sum(0))
        logits = model(inputs_embeds=torch.stack(inputs)[None]).logits[0] / temperature
        logp = torch.log_softmax(logits[len(prompt) - 1 :], -1)
        out[n, :length] = logp.gather(-1, traj.ids[n, :length])
    return out


def test_sequence_layout():
    traj = _trajectories()
    batch = build_sequence_batch(traj)
    assert batch.prompt_length == 4 and batch.input_ids.shape == (3, 4 + 5 - 1, K)
    assert batch.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert batch.position_ids[1, 2:5].tolist() == [0, 1, 2]
    assert batch.input_ids[1, 2:4, 0].tolist() == [9, 10]
    assert batch.input_weights[1, 2, :].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(batch.input_ids[0, 4:], traj.ids[0, :4])


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logprobs_match_a_plain_forward_per_trajectory(model, temperature):
    traj = _trajectories()
    scores = score_trajectories(
        model, traj, MixtureSpec(temperature=temperature), likelihood="token"
    )
    expected = _naive_logprobs(model, traj, temperature)
    real = traj.completion_mask.unsqueeze(-1).expand_as(expected)
    assert torch.allclose(scores.logprobs[real], expected[real], atol=1e-5)


def test_discrete_trajectories_match_token_logprobs_of_transformers(model):
    prompts = [[3, 4, 5], [6, 7]]
    completions = torch.tensor([[10, 11, 12], [13, 14, 15]])
    ids = completions.unsqueeze(-1).expand(2, 3, K).clone()
    weights = torch.zeros(2, 3, K)
    weights[..., 0] = 1
    mask = weights.bool()
    phase = torch.full((2, 3), Phase.DISCRETE, dtype=torch.int8)
    traj = Trajectories(
        prompts,
        ids,
        weights.log(),  # weight logits
        mask,
        torch.zeros(2, 3, dtype=torch.long),
        phase,
        torch.zeros(2, 3, K),
    )
    for likelihood in ("token", "weighted", "exact"):
        spec = MixtureSpec(k=K, selection="sample", weighting="dirichlet")
        scores = score_trajectories(model, traj, spec, likelihood=likelihood)
        for n, prompt in enumerate(prompts):
            seq = torch.tensor([prompt + completions[n].tolist()])
            logp = torch.log_softmax(model(seq).logits[0, len(prompt) - 1 : -1], -1)
            expected = logp.gather(-1, completions[n, :, None]).squeeze(-1)
            assert torch.allclose(scores.action_logprob[n], expected, atol=1e-5), likelihood


@pytest.mark.parametrize("likelihood", ["weighted", "exact"])
def test_mixture_positions_use_the_chosen_likelihood_and_backprop(model, likelihood):
    traj = _trajectories()
    spec = MixtureSpec(k=K, selection="sample", weighting="gumbel", gumbel_temperature=0.7)
    scores = score_trajectories(model, traj, spec, likelihood=likelihood)
    rest = None if scores.rest_logprob is None else scores.rest_logprob.detach()
    expected = action_logprob(
        scores.logprobs.detach(),
        traj.mask,
        traj.token_slot,
        spec,
        likelihood=likelihood,
        weight_logits=traj.weight_logits,
        rest_logprob=rest,
    )
    is_mix = traj.phase == Phase.MIXTURE
    assert torch.allclose(scores.action_logprob.detach()[is_mix], expected[is_mix], atol=1e-5)
    loss = -(scores.action_logprob * traj.completion_mask).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()


@pytest.mark.parametrize("weighting", ["prob", "dirichlet"])
def test_training_forward_reproduces_the_rollout_logprobs(weighting):
    """The cached rollout and the training forward agree on log p at every stored id."""
    from motg_fast.rollout.engine import RolloutEngine
    from motg_fast.testing import tiny_qwen2, tiny_tokenizer

    model, tokenizer = tiny_qwen2(), tiny_tokenizer()
    engine = RolloutEngine(model, tokenizer, max_new_tokens=12)
    prompts = [tokenizer.encode("the answer <think>"), tokenizer.encode("a <think>")]
    spec = MixtureSpec(k=3, temperature=0.8, selection="sample", weighting=weighting)
    rollout = traj = engine.generate(prompts, spec, group_size=3, seed=4)
    with torch.no_grad():
        scores = score_trajectories(model, traj, spec, likelihood="exact")
    real = traj.completion_mask.unsqueeze(-1) & traj.mask
    assert real.sum() > 20
    assert torch.allclose(scores.logprobs[real], rollout.logprobs[real], atol=1e-5)


def test_models_that_transform_their_logits_are_refused(model):
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
            score_trajectories(model, _trajectories(), MixtureSpec(), likelihood="token")
    finally:
        model.config.final_logit_softcapping = None


def _grouped(traj: Trajectories, repeats: list[int]) -> Trajectories:
    """Row n of `traj` repeated `repeats[n]` times: rows that share their prompt."""
    rows = [n for n, r in enumerate(repeats) for _ in range(r)]
    return traj.select(rows)


def test_distinct_prompts_index_rows_by_first_appearance():
    from motg_fast.training.policy import distinct_prompts

    assert distinct_prompts([[1, 2], [3], [1, 3]]) is None  # nothing shared
    prompt_of_row, first_row = distinct_prompts([[1, 2], [3], [1, 2], [3], [4]])
    assert prompt_of_row.tolist() == [0, 1, 0, 1, 2]
    assert first_row.tolist() == [0, 1, 4]


@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_shared_prompt_forward_equals_the_full_forward_with_gradients(model, noise_std):
    """Each distinct prompt run once, its rows on copies of its KV cache: the same
    log-likelihoods and parameter gradients as one forward over every full row."""
    traj = _grouped(_trajectories(seed=1), [3, 1, 2])
    for n in range(traj.phase.shape[0]):  # distinct completions within each group
        traj.weights[n] = torch.softmax(torch.randn(traj.weights[n].shape), -1)
    traj.weights[traj.phase != Phase.MIXTURE] = torch.tensor([1.0, 0.0, 0.0])
    traj.noise_seed = torch.arange(traj.phase.shape[0])
    weighting = "prob" if noise_std else "dirichlet"
    spec = MixtureSpec(k=K, selection="sample", weighting=weighting, noise_std=noise_std)
    got = {}
    for share in (False, True):
        model.zero_grad()
        scores = score_trajectories(
            model, traj, spec, likelihood="exact", share_prompt=share, backward_once=True
        )
        (scores.action_logprob * traj.completion_mask).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        got[share] = scores, grads
    model.zero_grad()
    (full, full_grads), (shared, shared_grads) = got[False], got[True]
    real = traj.completion_mask
    assert torch.allclose(shared.action_logprob[real], full.action_logprob[real], atol=1e-5)
    assert torch.allclose(shared.hidden[real], full.hidden[real], atol=1e-5)
    for name, grad in full_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-6), name


@contextlib.contextmanager
def _training(model, checkpointing: str | None = None):
    """`model` in train mode for the block, with activation checkpointing
    (`"reentrant"`/`"non_reentrant"`) or without (None); eval mode again afterwards."""
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    model.train()
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def _backward(model, traj, spec, **options):
    """Fresh gradients of the completions' summed log-likelihoods (`score_trajectories`
    with `backward_once`); returns the scores."""
    model.zero_grad()
    scores = score_trajectories(model, traj, spec, backward_once=True, **options)
    (scores.action_logprob * traj.completion_mask).sum().backward()
    return scores


@pytest.mark.parametrize("checkpointing", [False, True])
def test_weights_used_twice_get_each_use_accumulated_without_holding_it(model, checkpointing):
    """In one process with `backward_once`, a weight serving two pieces of the forward has
    each piece's gradient accumulated into `.grad` as soon as that piece is
    back-propagated, instead of autograd holding the first until the second arrives (one
    accumulation): the shared prompt's two passes (a decoder weight: 2 with sharing, 1
    without) and the tied LM head and input embedding (2 either way). Same gradients as
    the single graph."""
    traj = _grouped(_trajectories(seed=3), [3, 2])
    spec = MixtureSpec(k=K, selection="sample", weighting="dirichlet")
    weights = {
        "decoder": model.model.layers[0].mlp.down_proj.weight,
        "tied": model.get_input_embeddings().weight,
    }
    assert model.lm_head.weight is weights["tied"]
    counts = dict.fromkeys(weights, 0)
    hooks = [
        w.register_post_accumulate_grad_hook(lambda p, n=name: counts.__setitem__(n, counts[n] + 1))
        for name, w in weights.items()
    ]
    got = {}
    try:
        for share in (False, True):
            counts.update(dict.fromkeys(weights, 0))
            with _training(model, "non_reentrant" if checkpointing else None):
                _backward(model, traj, spec, likelihood="exact", share_prompt=share)
            got[share] = dict(counts), {n: w.grad.clone() for n, w in weights.items()}
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad()
    assert got[False][0] == {"decoder": 1, "tied": 2}
    assert got[True][0] == {"decoder": 2, "tied": 2}
    for name in weights:
        assert torch.allclose(got[True][1][name], got[False][1][name], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_does_not_share_the_prompt(model):
    """Reentrant checkpointing replays a layer without a graph, so a shared prompt's keys
    would carry no gradient from the fed-back pass: prompts are not shared there, and the
    gradients are the full forward's."""
    traj = _grouped(_trajectories(seed=4), [3, 2])
    spec = MixtureSpec(k=K)
    got = {}
    for reentrant in (False, True):
        with _training(model, "reentrant" if reentrant else "non_reentrant"):
            assert can_share_prompt(model) is not reentrant
            _backward(model, traj, spec, likelihood="token")
        got[reentrant] = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for name, grad in got[False].items():
        assert torch.allclose(got[True][name], grad, rtol=1e-4, atol=1e-6), name


def test_one_action_rows_share_the_prompt(model):
    traj = _grouped(_trajectories(), [2, 2, 1])
    one = traj.select(list(range(5)))
    one = Trajectories(
        one.prompt_ids,
        *(getattr(one, f)[:, :1] for f in ("ids", "weight_logits", "mask")),
        one.token_slot[:, :1],
        one.phase[:, :1],
        one.logprobs[:, :1],
    )
    spec = MixtureSpec(k=K)
    with torch.no_grad():
        for batch in (traj, one):
            full = score_trajectories(model, batch, spec, likelihood="token", share_prompt=False)
            shared = score_trajectories(model, batch, spec, likelihood="token")
            assert torch.allclose(shared.logprobs, full.logprobs, atol=1e-5)


def test_shared_prompt_under_gradient_checkpointing_keeps_values_and_gradients(model):
    """Checkpointing replays each layer in backward; the shared prompt's cache must give the
    replay the same keys (a cache that appended would double them): same log-likelihoods
    and gradients as the full forward without checkpointing."""
    traj = _grouped(_trajectories(seed=2), [3, 2])
    spec = MixtureSpec(k=K, selection="sample", weighting="dirichlet")
    got = {}
    for checkpointing, share in ((False, False), (True, True)):
        with _training(model, "non_reentrant" if checkpointing else None):
            assert can_share_prompt(model)  # the shared path, not the fallback
            scores = _backward(model, traj, spec, likelihood="exact", share_prompt=share)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        got[checkpointing] = scores.action_logprob.detach(), grads
    model.zero_grad()
    (full, full_grads), (checkpointed, grads) = got[False], got[True]
    real = traj.completion_mask
    assert torch.allclose(checkpointed[real], full[real], atol=1e-5)
    for name, grad in full_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
