"""The Triton rollout step as the custom op `motg_fast::mixture_step`: its registration
(schema, fake implementation, under `torch.library.opcheck`), a whole-graph compile of a
step that calls it with the kernels' own outputs, the reference's choices for the same
noise, and a compiled rollout through it. On a CPU the kernels run in Triton's interpreter."""

import numpy as np
import pytest
import torch

from motg_fast.kernels import HAS_TRITON, MixtureSpec, StepNoise, triton_interpreter_on
from motg_fast.kernels.mixture_step import mixture_step_ref
from motg_fast.kernels.step_op import (
    check_compilable,
    mixture_step_compilable,
    spec_from_key,
    spec_key,
    uses_step_op,
)
from motg_fast.rollout.engine import RolloutEngine
from motg_fast.rollout.static_decode import draw_noise
from motg_fast.testing import tiny_llama, tiny_tokenizer

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not HAS_TRITON or not (torch.cuda.is_available() or triton_interpreter_on()),
        reason="needs triton with CUDA or the interpreter (TRITON_INTERPRET=1)",
    ),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS, VOCAB, WIDTH = 5, 256, 16
SPECS = {
    "discrete": MixtureSpec(k=1, selection="sample"),
    "topk_prob": MixtureSpec(k=3, temperature=0.7),
    "gumbel_sample": MixtureSpec(
        k=3, selection="sample", weighting="gumbel", representative="sample"
    ),  # fmt: skip
    "iid": MixtureSpec(k=4, selection="iid", weighting="uniform", representative="argmax"),
    "sample_topk": MixtureSpec(k=3, selection="sample_topk", top_p=0.9),
    "blend": MixtureSpec.preset("moi").replace(k=3),
}


def _inputs(name: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(ROWS, VOCAB, generator=generator)).to(DEVICE)
    logits[0, :3] = 40.0  # a confident row
    embedding = torch.randn(VOCAB, WIDTH, generator=generator).to(DEVICE)
    spec = SPECS[name]
    noise = draw_noise(spec, ROWS, VOCAB, torch.Generator(DEVICE).manual_seed(seed), DEVICE)
    return logits, embedding, spec, noise


def _args(logits, embedding, spec, noise):
    return (logits, embedding, spec_key(spec), noise.selection, noise.weight, noise.token)


@pytest.mark.parametrize("name", list(SPECS))
def test_the_op_passes_opcheck(name):
    """Schema, fake (meta) implementation against the real outputs, and tracing."""
    torch.library.opcheck(torch.ops.motg_fast.mixture_step.default, _args(*_inputs(name)))


@pytest.mark.parametrize("name", list(SPECS))
def test_a_whole_graph_compile_of_the_op_gives_the_kernels_outputs(name):
    """fullgraph=True fails on any graph break: the op is one node of the graph."""
    logits, embedding, spec, noise = _inputs(name, seed=1)

    def step(logits, embedding, noise):
        out = mixture_step_compilable(logits, embedding, spec, noise, backend="triton")
        return out.embeds * 2, out

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_embeds, eager = step(logits, embedding, noise)
    got_embeds, got = compiled(logits, embedding, noise)
    assert torch.equal(got_embeds, eager_embeds)
    for field, value in eager._asdict().items():
        other = getattr(got, field)
        assert (value is None) == (other is None), field
        if value is not None:
            assert torch.equal(other, value), field


@pytest.mark.parametrize("name", list(SPECS))
def test_the_op_makes_the_references_choices_for_the_same_noise(name):
    logits, embedding, spec, noise = _inputs(name, seed=2)
    op = mixture_step_compilable(logits, embedding, spec, noise, backend="triton")
    ref = mixture_step_ref(logits, embedding, spec, noise=noise)
    assert torch.equal(op.ids, ref.ids) and torch.equal(op.token, ref.token)
    assert torch.equal(op.mask, ref.mask) and torch.equal(op.token_slot, ref.token_slot)
    for field in ("weights", "logprobs", "logsumexp", "entropy", "embeds"):
        assert torch.allclose(getattr(op, field), getattr(ref, field), atol=1e-5), field
    assert (op.rest_logprob is None) == (ref.rest_logprob is None)
    if ref.rest_logprob is not None:
        assert torch.allclose(op.rest_logprob, ref.rest_logprob, atol=1e-5)


def test_the_spec_travels_to_the_op_whole():
    """The op's string argument gives the spec back, numpy floats included."""
    for spec in (*SPECS.values(), MixtureSpec(k=2, temperature=np.float64(0.7), top_p=0.9)):
        assert spec_from_key(spec_key(spec)) == spec


def test_the_path_follows_the_backend_and_the_spec():
    cpu = torch.device("cpu")
    assert not uses_step_op(MixtureSpec(k=2), cpu)  # auto on a CPU: the reference
    assert uses_step_op(MixtureSpec(k=2), cpu, backend="triton")
    assert not uses_step_op(MixtureSpec(k=65), cpu, backend="triton")  # over TRITON_MAX_K


def test_steps_a_graph_cannot_run_are_refused():
    with pytest.raises(ValueError, match="cannot draw weighting='dirichlet'"):
        check_compilable(MixtureSpec(k=2, weighting="dirichlet"))
    with pytest.raises(ValueError, match="needs its selection noise given"):
        check_compilable(MixtureSpec(k=2, selection="sample"), StepNoise())
    with pytest.raises(ValueError, match="needs its token noise given"):
        spec = MixtureSpec(k=2, representative="sample")
        check_compilable(spec, draw_noise(spec.replace(representative="argmax"), 1, 8, None, "cpu"))


def test_a_compiled_rollout_through_the_op_equals_it_run_eagerly_and_the_reference():
    """The engine's compiled decode with the Triton path: the same rollout compiled or not,
    and the same discrete choices as the compiled reference path for the same seed."""
    tokenizer = tiny_tokenizer()
    prompts = [tokenizer.encode(text) for text in ("the answer is", "a b")]
    model = tiny_llama()
    spec = MixtureSpec(k=3, selection="sample", weighting="gumbel", representative="sample")
    runs = {}
    for backend in ("triton", "reference"):
        engine = RolloutEngine(model, tokenizer, max_new_tokens=5, compile_decode=True,
                               think_end=None, backend=backend)  # fmt: skip
        torch._dynamo.reset()
        engine.compiled_step(backend="aot_eager")
        runs[backend] = engine.generate(prompts, spec, group_size=2, seed=4)
        if backend == "triton":
            with torch.compiler.set_stance("force_eager"):
                eager = engine.generate(prompts, spec, group_size=2, seed=4)
    triton, reference = runs["triton"], runs["reference"]
    # the compiled model forward sums in another order: weights agree to float32 rounding
    assert torch.equal(triton.ids, eager.ids) and triton.texts == eager.texts
    assert torch.allclose(triton.weights, eager.weights, atol=1e-5)
    assert torch.equal(triton.ids, reference.ids) and triton.texts == reference.texts
    assert torch.allclose(triton.weights, reference.weights, atol=1e-5)
