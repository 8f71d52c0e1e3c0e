"""One GRPO step (rollout + training update): the trainer vs a naive paper-style step.

    pytest bench/bench_train_step.py --benchmark-only -s

Naive step (the shape of the paper's code): the eager per-step rollout loop of
`bench_rollout.naive_mixture_rollout` (each group member prefilled separately, a growing
DynamicCache, eager step ops), then a training forward that materialises the full `[N,L,V]`
logits and a float32 log-softmax, the `weighted` likelihood, a group-normalised
policy-gradient loss, backward and an AdamW step.

Ours: `Trainer.train_step` (rollout engine with shared prefill and preallocated cache,
`mixture_embed` → model → `mixture_logprobs` without `[N,L,V]` logits), same decoding
(k = 2, top-k, Dirichlet weights, τ = 0.9), the same likelihood and optimiser.

Both start from the same weights and prompts; EOS is disabled so both generate the full
length. CPU: a tiny random Qwen2 (G = 4, 32 new tokens, one intra-op thread). CUDA: a
Qwen2.5-1.5B-shaped random model (fp32 master weights, bf16 autocast; G = 10, 512 new
tokens); peak memory from `torch.cuda.max_memory_allocated` goes to `extra_info`.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from bench_rollout import left_pad, naive_mixture_rollout, qwen25_1p5b_config
from transformers import Qwen2ForCausalLM

from motg_fast.config import Config
from motg_fast.tasks.prompting import build_prompts
from motg_fast.testing import ToyTasks, letter_reward, tiny_qwen2, tiny_tokenizer
from motg_fast.training.grpo import group_advantages
from motg_fast.training.trainer import Trainer

HAS_CUDA = torch.cuda.is_available()
TEMPERATURE = 0.9
K = 2


def naive_train_step(model, optimizer, tokenizer, prompts, group_size, max_new_tokens) -> None:
    """Rollout with the eager loop, then one update through materialised logits."""
    roll = naive_mixture_rollout(
        model,
        prompts,
        group_size,
        max_new_tokens,
        k=K,
        temperature=TEMPERATURE,
        think_end_ids=tokenizer.encode("</think>"),
        eos_id=-1,
        pad=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(roll.token)
    rewards, _ = letter_reward(texts, [None] * len(texts))
    advantages = group_advantages(torch.tensor(rewards), group_size).to(model.device)
    rows = [p for p in prompts for _ in range(group_size)]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id, model.device)
    embed = model.get_input_embeddings()
    fed = (embed(roll.ids[:, :-1]) * roll.weights[:, :-1, :, None].to(embed.weight.dtype)).sum(2)
    inputs = torch.cat([embed(prompt_ids), fed], dim=1)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(fed.shape[:2])], dim=1)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=HAS_CUDA):
        logits = model(inputs_embeds=inputs, attention_mask=mask).logits  # [N, L, V]
    start = prompt_ids.shape[1] - 1
    logp = torch.log_softmax(logits[:, start:].float() / TEMPERATURE, dim=-1)  # [N, T, V]
    at_ids = logp.gather(-1, roll.ids)  # [N, T, k]
    ell = (at_ids.softmax(-1) * at_ids).sum(-1)  # the `weighted` likelihood
    loss = -(advantages[:, None] * ell).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Setup:
    def __init__(self, model, tokenizer, group_size, max_new_tokens, run_dir):
        model.generation_config.eos_token_id = None
        self.tokenizer = tokenizer
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.config = Config(
            model="bench",
            tasks="leg_counting",
            run_dir=str(run_dir),
            seed=0,
            k=K,
            selection="topk",
            weighting="dirichlet",
            likelihood="weighted",
            temperature=TEMPERATURE,
            group_size=group_size,
            prompts_per_step=1,
            grad_accum=1,
            steps=10**6,
            lr=1e-6,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=512,
            save_every=0,
            progress=False,
            eps_low=math.inf,
            eps_high=math.inf,
            system_prompt="Answer.",
            final_eval="none",
        )
        self.naive_model = copy.deepcopy(model).train()
        self.naive_optimizer = torch.optim.AdamW(self.naive_model.parameters(), lr=1e-6)
        self.trainer = Trainer(
            self.config,
            model=model.train(),
            tokenizer=tokenizer,
            task_set=ToyTasks(),
            reward_fn=letter_reward,
        )
        self.trainer.engine.eos_token_ids = []
        question = self.trainer.step_items(0)[0][0].question
        self.prompts = [
            p.ids for p in build_prompts(tokenizer, [question], system_prompt="Answer.")
        ]
        self.step = 0

    def ours(self) -> None:
        self.trainer.train_step(self.step)
        self.step += 1
        self.sync()

    def naive(self) -> None:
        naive_train_step(
            self.naive_model,
            self.naive_optimizer,
            self.tokenizer,
            self.prompts,
            self.group_size,
            self.max_new_tokens,
        )
        self.sync()

    @staticmethod
    def sync() -> None:
        if HAS_CUDA:
            torch.cuda.synchronize()


@pytest.fixture(scope="module")
def cpu_setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_qwen2(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    yield Setup(model, tiny_tokenizer(), 4, 32, tmp_path_factory.mktemp("run"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    config = qwen25_1p5b_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    return Setup(model, tiny_tokenizer(), 10, 512, tmp_path_factory.mktemp("run"))


def measure_pair(benchmark, setup, rounds: int) -> dict[str, float]:
    """Alternate the two steps `rounds` times; fastest time (and peak memory on CUDA) each."""
    best = {"ours": math.inf, "naive": math.inf}
    peak = {"ours": 0.0, "naive": 0.0}
    runs = {"ours": setup.ours, "naive": setup.naive}

    def sweep() -> None:
        for name, run in runs.items():
            if HAS_CUDA:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
            if HAS_CUDA:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)

    benchmark.pedantic(sweep, rounds=rounds, iterations=1, warmup_rounds=1)
    info = {f"{n}_step_s": t for n, t in best.items()}
    info["speedup"] = best["naive"] / best["ours"]
    if HAS_CUDA:
        info.update({f"{n}_peak_gib": m for n, m in peak.items()})
        info["memory_ratio"] = peak["ours"] / peak["naive"]
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3f}" for k, v in info.items()))
    return info


def test_grpo_step_cpu(benchmark, cpu_setup):
    benchmark.group = "grpo-step-cpu"
    measure_pair(benchmark, cpu_setup, rounds=3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_grpo_step_gpu(benchmark, gpu_setup):
    benchmark.group = "grpo-step-gpu"
    measure_pair(benchmark, gpu_setup, rounds=2)
