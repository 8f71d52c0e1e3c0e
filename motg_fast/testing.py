"""Test doubles shared by the tests, benchmarks and scripts: tiny random causal LMs, a tiny
local tokenizer, a trivially learnable toy task, and the tiny run config.

Nothing here downloads anything: models are built from configs with a fixed seed, the
tokenizer is a hand-made byte-level BPE (the scheme of GPT-2 and Qwen) built with the
`tokenizers` library.

    tokenizer = tiny_tokenizer()          # ~280 tokens; "</think>" is 3 tokens: "</", "think", ">"
    model = tiny_qwen2()                  # or tiny_llama(); vocab 300, float32, eval mode
    model = SteeredLM(model, {12: eos})   # force token `eos` at absolute position 12
    config = tiny_config(run_dir, k=2)    # a seconds-long run on `ToyTasks` (Config fields)

`configure_environment()` (call it before anything imports `motg_fast.kernels`) selects
Triton's CPU interpreter when there is no GPU; `skip_gpu_tests` skips tests marked `gpu`.
Importing this module imports neither a kernel nor transformers (which imports Triton).

The model vocabulary (300) is larger than the tokenizer's, as with real checkpoints whose
embedding matrix is padded; ids past the tokenizer decode to the empty string.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from .tasks.base import TaskItem

# transformers and tokenizers are imported inside the functions that use them: importing
# this module must not import Triton (transformers does) before `configure_environment`.

HAS_CUDA = torch.cuda.is_available()


def configure_environment() -> None:
    """Triton's interpreter when there is no GPU; tests choose their backend explicitly."""
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("MOTG_BACKEND", None)


def skip_gpu_tests(items) -> None:
    """Skip every pytest item marked `gpu` when no CUDA device is present."""
    import pytest

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


VOCAB_SIZE = 300
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Merges written on plain text; `_byte_level` maps them to the byte-level alphabet (" " -> "Ġ").
_MERGES = [
    ("t", "h"),
    ("i", "n"),
    ("th", "in"),
    ("thin", "k"),
    ("<", "/"),
    ("a", "n"),
    ("s", "w"),
    ("e", "r"),
    ("an", "sw"),
    ("answ", "er"),
    (" ", "t"),
    (" t", "h"),
    (" th", "e"),
    (" ", "a"),
    (" ", "i"),
    (" i", "s"),
    ("o", "n"),
    ("e", "d"),
    ("r", "e"),
    ("a", "t"),
    ("\n", "\n"),
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _byte_level(text: str, table: dict[int, str]) -> str:
    return "".join(table[b] for b in text.encode("utf-8"))


def tiny_tokenizer():
    """A byte-level BPE tokenizer of ~280 tokens with EOS and pad tokens.

    Ids 0..255 are the 256 bytes (in byte order), then one id per merge, then the special
    tokens `<|endoftext|>` (EOS) and `<|pad|>`. The end-of-thinking marker "</think>" is
    encoded as three tokens ("</", "think", ">"), "<think>" as ("<", "think", ">").
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = []
    for left, right in _MERGES:
        left_b, right_b = _byte_level(left, table), _byte_level(right, table)
        merges.append((left_b, right_b))
        vocab.setdefault(left_b + right_b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }


def _build(model_cls, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def _tiny(config_cls, model_cls, seed: int, tie_word_embeddings: bool, overrides: dict):
    """A random 2-layer model (hidden 64, 4 query / 2 KV heads, vocab 300), float32, SDPA."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=tie_word_embeddings,
        **_special_ids(tiny_tokenizer()),
    )
    fields.update(overrides)
    config = config_cls(**fields)
    config._attn_implementation = "sdpa"
    return _build(model_cls, config, seed)


def tiny_qwen2(seed: int = 0, **overrides):
    """A random tiny `Qwen2ForCausalLM` with an untied LM head (see `_tiny`).

    `overrides` replace config fields (e.g. `hidden_size=256, num_hidden_layers=4`).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2Config, Qwen2ForCausalLM, seed, False, overrides)


def tiny_llama(seed: int = 0, **overrides):
    """A random tiny `LlamaForCausalLM` with the LM head tied to the embedding (`_tiny`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaConfig, LlamaForCausalLM, seed, True, overrides)


def qwen25_1p5b_config():
    """The `Qwen2Config` shape of Qwen2.5-1.5B (random weights are built from it; nothing is
    downloaded)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )


class SteeredLM(torch.nn.Module):
    """Wraps a causal LM and forces chosen tokens at chosen absolute positions.

    `forced` maps the absolute position of a *generated* token (prompt length + completion
    index, i.e. the position id of the input that produces it plus one) to a token id; the
    logits of that step get `+bias` on that id, so every decoding mode picks it (its
    probability is ~1 - e^-bias). Tokens in `suppressed` get `-bias` everywhere else (e.g.
    the EOS id, so that a random model never stops by chance). The rest is the wrapped
    model's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        forced: dict[int, int],
        *,
        suppressed: tuple[int, ...] = (),
        bias: float = 40.0,
    ):
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = model.generation_config
        self.forced = dict(forced)
        self.suppressed = tuple(suppressed)
        self.bias = bias

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, *, position_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs):
        out = self.model(position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        logits = out.logits
        produced = position_ids[:, -logits.shape[1] :] + 1  # [B,q] position each row chooses
        shift = torch.zeros_like(logits)
        for token in self.suppressed:
            shift[..., token] = -self.bias
        for position, token in self.forced.items():
            hit = produced == position
            shift[..., token] = torch.where(hit, self.bias, shift[..., token])
        out.logits = logits + shift
        return out


# --------------------------------------------------------------------------------------
# A toy task and the tiny run
# --------------------------------------------------------------------------------------


def _letters_score(answer: str | None, entry: dict) -> float:
    """1 when the answer holds the letter "a"."""
    return float(answer is not None and "a" in answer)


def _toy_item(number: int | None) -> TaskItem:
    question = "say a" if number is None else f"say a {number}"
    index = -1 if number is None else number
    return TaskItem("letters", index, {"question": question, "answer": "a"}, _letters_score)


class ToyTasks:
    """Questions "say a N" (N < 10) with the task-set interface the trainer needs; the reward
    (`letter_reward`) counts the letter "a", so a tiny model learns it in a few steps."""

    names = ["letters"]

    def sample_train(self, n: int, rng: random.Random) -> list[TaskItem]:
        return [_toy_item(rng.randrange(10)) for _ in range(n)]

    def heldout(self, per_task: int | None = None) -> list[TaskItem]:
        return [_toy_item(None)]


def letter_reward(completions: list[str], items: list) -> tuple[list[float], list[float]]:
    """Reward: occurrences of "a" / 8; correct when above 0.5."""
    rewards = [text.count("a") / 8 for text in completions]
    return rewards, [float(r > 0.5) for r in rewards]


TINY_RUN: dict[str, Any] = dict(
    model="unused-in-tests",
    tasks="leg_counting",
    seed=3,
    temperature=1.0,
    group_size=4,
    prompts_per_step=2,
    grad_accum=2,
    steps=2,
    lr=3e-3,
    max_new_tokens=8,
    max_prompt_tokens=64,
    save_every=0,
    progress=False,
    warmup_ratio=0.25,
    grad_clip=1.0,
    system_prompt="Answer.",
    final_eval="none",
)
"""The seconds-long run of the trainer tests (a tiny model and `ToyTasks` are passed in)."""


def tiny_config(run_dir: str | Path, /, **changes: Any):
    """A `Config` of `TINY_RUN` in `run_dir`, with field `changes` (a `run_dir` among them
    wins)."""
    from .config import Config

    return Config(**{**TINY_RUN, "run_dir": str(run_dir), **changes})


def save_tiny_model(path: str | Path, **overrides: Any) -> Path:
    """The tiny Qwen2 (`max_position_embeddings` 1024 unless overridden) and the tiny
    tokenizer saved as a local model directory at `path`."""
    path = Path(path)
    tiny_qwen2(**{"max_position_embeddings": 1024, **overrides}).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
