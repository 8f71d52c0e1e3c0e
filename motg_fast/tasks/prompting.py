"""The reasoning format: think inside ``<think>…</think>``, answer inside ``<answer>…</answer>``.

A prompt is the tokenizer's chat template applied to ``[system, user]`` with the generation prompt
added, followed by ``<think>`` so that the completion starts inside the thinking phase (the MoT-G
phase). Tokenizers without a chat template get a plain-text layout (:func:`plain_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"

SYSTEM_PROMPT = (
    "Always reply with two parts: your reasoning inside <think> </think>, then the final answer "
    "inside <answer> </answer>. Example: <think> 2 + 3 = 5 </think> <answer>5</answer>"
)
"""A task-neutral system prompt asking for the reasoning format (the paper preset's; give
tasks other than arithmetic this or a prompt of their own)."""

ARITHMETIC_SYSTEM_PROMPT = (
    "You solve arithmetic. Think briefly inside <think> </think>, then write only the final "
    "number inside <answer> </answer>.\n"
    "Question: Calculate 3 + 4.\n<think> 3 + 4 = 7 </think> <answer>7</answer>\n"
    "Question: Calculate -2 * 5.\n<think> -2 * 5 = -10 </think> <answer>-10</answer>\n"
    "Question: Calculate 9 - -3.\n<think> 9 - -3 = 9 + 3 = 12 </think> <answer>12</answer>"
)
"""The format with three worked examples of the default task (a 135M model follows the
format from examples, rarely from instructions alone)."""

DEFAULT_SYSTEM_PROMPT = ARITHMETIC_SYSTEM_PROMPT
"""The one default system prompt: of the command line, the config, the prompt functions and
the examples (the default task's: for another task use :data:`SYSTEM_PROMPT` or a prompt
of its own, ``--system_prompt``)."""


@dataclass(frozen=True)
class Prompt:
    """A formatted prompt: its token ids (to feed the model) and its text."""

    ids: list[int]
    text: str
    truncated: bool = False


def plain_prompt(question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt text for tokenizers without a chat template (no trailing ``<think>``)."""
    return f"{system_prompt}\n\nQuestion: {question}\n\nAnswer: "


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The full prompt text for ``question``, ending with the prefilled ``<think>``."""
    if has_chat_template(tokenizer):
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question},
        ]
        try:
            head = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 - templates without a system role raise
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{question}"}]
            head = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    else:
        head = plain_prompt(question, system_prompt)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and not head.startswith(bos):
            head = bos + head
    return head + THINK_START


def _encode(tokenizer, text: str) -> list[int]:
    # The template (or the plain layout above) already holds any special tokens it needs.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_MIDDLE = " … "


def _cut_middle(tokenizer, question_ids: list[int], keep: int) -> str:
    """The question text keeping ``keep`` of its tokens: its start and its end, joined by ``…``."""
    head, tail = keep - keep // 2, keep // 2
    end = tokenizer.decode(question_ids[len(question_ids) - tail :]) if tail else ""
    return tokenizer.decode(question_ids[:head]) + _MIDDLE + end


def build_prompt(
    tokenizer,
    question: str,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    max_prompt_tokens: int | None = None,
) -> Prompt:
    """Format ``question`` in the reasoning format and tokenize it.

    When the prompt is longer than ``max_prompt_tokens``, tokens are cut from the middle of the
    question (the instructions at both ends survive) and ``truncated`` is set. Raises
    ``ValueError`` if the template alone does not fit.
    """
    text = prompt_text(tokenizer, question, system_prompt)
    ids = _encode(tokenizer, text)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return Prompt(ids, text)
    question_ids = _encode(tokenizer, question)
    overhead = len(ids) - len(question_ids) + len(_encode(tokenizer, _MIDDLE))
    for slack in (0, 2, 4, 8, 16):  # re-tokenising at the cuts can shift a token or two
        keep = max_prompt_tokens - overhead - slack
        if keep < 0:
            break
        text = prompt_text(tokenizer, _cut_middle(tokenizer, question_ids, keep), system_prompt)
        ids = _encode(tokenizer, text)
        if len(ids) <= max_prompt_tokens:
            return Prompt(ids, text, truncated=True)
    raise ValueError(
        f"max_prompt_tokens={max_prompt_tokens} is too small for the prompt template "
        f"({overhead} tokens without the question)"
    )


def build_prompts(tokenizer, questions: list[str], **kwargs) -> list[Prompt]:
    """:func:`build_prompt` for each question."""
    return [build_prompt(tokenizer, q, **kwargs) for q in questions]
