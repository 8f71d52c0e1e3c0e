"""The compiled decode path: one decode step that `torch.compile(fullgraph=True)` captures
whole for discrete decoding and every method preset it supports, compiled rollouts equal to
the same path run eagerly, deterministic specs equal to the eager engine, and clear errors."""

import pytest
import torch

from motg_fast.config import Config
from motg_fast.kernels import MixtureSpec
from motg_fast.kernels.spec import METHODS
from motg_fast.rollout.engine import RolloutEngine
from motg_fast.testing import THINK_END, SteeredLM, tiny_llama, tiny_tokenizer

TEXTS = ["the answer <think>", "a <think>", "is the answer is on <think>"]
STATIC_METHODS = [name for name in METHODS if METHODS[name].fields.get("weighting") != "dirichlet"]
# Inductor fuses the float32 sums of the forward differently: logits agree to ~1e-6 here,
# weights (softmax of weight logits) to float32 rounding; discrete outputs exactly.
WEIGHTS_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(text) for text in TEXTS]


def steered(tokenizer, prompts, *, marker_at: int = 2, eos_at: int = 6) -> SteeredLM:
    """A tiny Llama that writes the end-of-thinking marker from completion index `marker_at`
    and EOS at `eos_at` of the longest prompt: shorter prompts get both later, so rows
    switch phase and finish at different steps."""
    width = max(len(p) for p in prompts)
    forced = {width + marker_at + i: t for i, t in enumerate(tokenizer.encode(THINK_END))}
    forced[width + eos_at] = tokenizer.eos_token_id
    return SteeredLM(tiny_llama(), forced, suppressed=(tokenizer.eos_token_id,))


def _spec(name: str) -> MixtureSpec:
    spec = MixtureSpec.preset(name)
    return spec.replace(k=min(spec.k, 4))  # the tiny vocabulary; the same code paths


def _engine(model, tokenizer, **options) -> RolloutEngine:
    return RolloutEngine(model, tokenizer, max_new_tokens=10, compile_decode=True, **options)


@pytest.mark.parametrize("name", STATIC_METHODS)
def test_the_decode_step_traces_whole_for_every_method(name, tokenizer, prompts):
    """fullgraph=True: any graph break (a host sync such as `.item()` or `.tolist()`, or a
    branch on a tensor's value) is an error, so the step has none."""
    engine = _engine(steered(tokenizer, prompts), tokenizer)
    engine.compiled_step(backend="eager")  # dynamo's whole-graph trace, no code generation
    torch._dynamo.reset()
    traj = engine.generate(prompts, _spec(name), group_size=2, seed=0)
    assert traj.ids.shape[0] == 6 and traj.texts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["discrete", "softgrpo", "multiplex", "moi", "soft_tokens"])
def test_compiled_rollouts_equal_the_same_step_run_eagerly(name, tokenizer, prompts):
    engine = _engine(steered(tokenizer, prompts), tokenizer)
    torch._dynamo.reset()
    with torch.compiler.set_stance("force_eager"):
        eager = engine.generate(prompts, _spec(name), group_size=2, seed=3)
    compiled = engine.generate(prompts, _spec(name), group_size=2, seed=3)
    assert torch.equal(eager.ids, compiled.ids) and torch.equal(eager.token, compiled.token)
    assert torch.equal(eager.mask, compiled.mask) and torch.equal(eager.phase, compiled.phase)
    assert torch.allclose(eager.weights, compiled.weights, atol=WEIGHTS_ATOL)
    assert eager.texts == compiled.texts and eager.stop_reasons == compiled.stop_reasons
    lengths = eager.lengths.tolist()
    assert len(set(lengths)) > 1, lengths  # rows finished at different steps


@pytest.mark.parametrize(
    "spec", [MixtureSpec(k=2, representative="argmax"), MixtureSpec(k=1)], ids=["topk", "greedy"]
)
def test_deterministic_specs_give_the_eager_engines_rollout(spec, tokenizer, prompts):
    """Without a marker (after one, answers are sampled with k = 1 unless the run is k = 1)
    and with rows stopping by EOS at different steps (the eager path compacts them)."""
    model = steered(tokenizer, prompts)
    eager = RolloutEngine(model, tokenizer, max_new_tokens=10, think_end=None)
    eager = eager.generate(prompts, spec, group_size=2)
    with torch.compiler.set_stance("force_eager"):
        static = _engine(model, tokenizer, think_end=None).generate(prompts, spec, group_size=2)
    assert eager.stats["compactions"] > 0
    assert torch.equal(eager.ids, static.ids) and eager.texts == static.texts
    assert torch.allclose(eager.weights, static.weights, atol=1e-6)
    assert torch.equal(eager.lengths, static.lengths)


def test_one_graph_serves_prompts_of_other_widths(tokenizer, prompts):
    """Capacities round up to a bucket: a new prompt width in the same bucket reuses the
    captured step (no recompilation)."""
    engine = _engine(steered(tokenizer, prompts), tokenizer)
    torch._dynamo.reset()
    engine.compiled_step(backend="eager")
    spec = MixtureSpec(k=2, selection="sample")
    engine.generate(prompts, spec, group_size=2, seed=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine.generate(prompts[:1] + prompts[1:2] * 2, spec, group_size=2, seed=1)


def test_dirichlet_weights_are_refused_before_any_step(tokenizer, prompts):
    engine = _engine(tiny_llama(), tokenizer)
    with pytest.raises(ValueError, match="cannot draw weighting='dirichlet'"):
        engine.generate(prompts, MixtureSpec.preset("paper_dirichlet"), group_size=2)
    with pytest.raises(ValueError, match="cannot draw weighting='dirichlet'"):
        Config(weighting="dirichlet", compile_decode=True)
    assert Config(weighting="gumbel", compile_decode=True).compile_decode
