"""End-of-thinking detection on decoded text, on the device, with no host sync.

The thinking phase ends after the representative token whose decoded text completes a
marker (default "</think>"). Detection works on *text*, not on the marker's token ids: a
character automaton of the marker is advanced by each token's decoded text, so any
tokenization of the marker (e.g. a merged `">\\n"` token) is caught. The automaton over the
whole vocabulary is one `[m+1, V]` transition table; advancing a batch of rows is one
gather per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _advance_text(marker: str, state: int, text: str) -> int:
    """Automaton state after reading `text` from `state` (len(marker) once the marker occurred)."""
    full = marker[:state] + text
    if marker in full:
        return len(marker)
    for length in range(min(len(marker) - 1, len(full)), 0, -1):
        if full.endswith(marker[:length]):
            return length
    return 0


def _token_transitions(marker: str, text: str) -> list[int]:
    """Next state from every state 0..m (m = len(marker), absorbing) after one token's text."""
    m = len(marker)
    if marker in text:
        return [m] * (m + 1)
    if text in marker:  # short tokens (and ""): the result depends on the state in general
        return [_advance_text(marker, s, text) for s in range(m)] + [m]
    # `text` is not a substring of the marker, so the longest marker prefix ending the text
    # lies inside `text` (independent of the state); only a match that starts in the
    # already-matched prefix and ends inside `text` depends on the state.
    tail = 0
    if text[-1] in marker:
        tail = next(
            (n for n in range(min(m - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0
        )
    column = [tail] * m + [m]
    if text[0] in marker:
        for j in range(1, m):
            if text.startswith(marker[j:]):
                for state in range(j, m):
                    if marker[:state].endswith(marker[:j]):
                        column[state] = m
    return column


def build_marker_table(marker: str, token_texts: Sequence[str]) -> torch.Tensor:
    """Transition table `[m+1, V]` int64 of the marker's character automaton over token texts.

    State s < m: the decoded text so far ends with `marker[:s]` (longest such s) and the
    marker has not occurred; state m: the marker occurred (absorbing). Row s, column v is
    the state after token v's text.
    """
    if not marker:
        raise ValueError("the end-of-thinking marker must be a non-empty string")
    columns = [_token_transitions(marker, text) for text in token_texts]
    return torch.tensor(columns, dtype=torch.int64).T.contiguous()


class MarkerMatcher:
    """Tracks, per row and on the device, whether the decoded text has produced `marker`.

    Args:
        marker: the end-of-thinking text, e.g. "</think>".
        token_texts: each vocabulary id decoded alone (`V` strings; ids the tokenizer does
            not know decode to ""). A marker starting with whitespace is not supported by
            tokenizers that drop a token's leading space when decoding it alone.
        device: where the `[m+1, V]` table lives.
    """

    def __init__(self, marker: str, token_texts: Sequence[str], device: torch.device):
        self.marker = marker
        self.table = build_marker_table(marker, token_texts).to(device)
        self.done_state = len(marker)
        self._flat = self.table.view(-1)
        self._vocab = self.table.shape[1]

    def start(self, rows: int) -> torch.Tensor:
        """Initial states `[rows]` int64 (nothing matched)."""
        return torch.zeros(rows, dtype=torch.int64, device=self.table.device)

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """States `[n]` after tokens `[n]` (no host sync)."""
        return self._flat[state * self._vocab + token]

    def matched(self, state: torch.Tensor) -> torch.Tensor:
        """`[n]` bool: the marker has occurred."""
        return state == self.done_state


def decode_token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id in `range(vocab_size)` decoded alone (ids unknown to the tokenizer give "")."""
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False)
    return [t if isinstance(t, str) else "" for t in texts]
