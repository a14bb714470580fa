"""Supervised fine-tuning examples: a dialog becomes one next-token piece, the loss on its answers.

The dialog is encoded in the Llama 2 chat format (`encode_dialog`), and the loss weight of each
prediction is the answer mask: 1 on the tokens (and EOS) of every trained answer, 0 on the system
prompt, the user turns and any answer marked `"train": False`. A dialog longer than a row loses
its oldest complete (user, answer) exchanges, the system prompt kept; when even its last exchange
does not fit, or no trained answer is left, the example is skipped. `scan` counts both.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llama2_jax.data.batch import Piece
from llama2_jax.data.chat import Message, encode_dialog
from llama2_jax.data.text import next_token_pieces
from llama2_jax.data.tokenizer import Tokenizer

KEPT, CUT, SKIPPED = "kept", "cut", "skipped"


def example_messages(example: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A dialog as messages, from a tfds chat example (columns of role, content, train) or a list."""
    messages = example["messages"]
    if isinstance(messages, Sequence):
        return [dict(message) for message in messages]
    as_text = lambda value: value.decode("utf-8") if isinstance(value, bytes) else str(value)  # noqa: E731
    return [{"role": as_text(role), "content": as_text(content), "train": bool(train)}
            for role, content, train in zip(messages["role"], messages["content"], messages["train"])]


class DialogPieces:
    """A dialog -> [one next-token piece of at most `seq_len` predictions], or [] when it cannot fit."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, example: Mapping[str, Any]) -> list[Piece]:
        return self.encode(example_messages(example))[0]

    def encode(self, messages: list[Message]) -> tuple[list[Piece], str]:
        """The pieces of a dialog and what happened to it: kept whole, cut (oldest turns dropped) or skipped."""
        first_turn = 1 if messages[0]["role"] == "system" else 0
        kept = list(messages)
        while True:
            encoded = encode_dialog(self.tokenizer, kept)
            if len(encoded.tokens) - 1 <= self.seq_len:
                break
            if len(kept) - first_turn <= 2:  # the last exchange alone does not fit
                return [], SKIPPED
            del kept[first_turn:first_turn + 2]
        weights = np.asarray(encoded.loss_mask, np.float32)
        if not weights[1:].any():  # every trained answer was in the turns dropped
            return [], SKIPPED
        tokens = np.asarray(encoded.tokens, np.int32)
        return next_token_pieces(tokens, weights, self.seq_len), KEPT if len(kept) == len(messages) else CUT


@dataclasses.dataclass(frozen=True)
class DialogCounts:
    """What one pass over a dialog dataset found: dialogs kept whole, cut, skipped, and the
    predictions (tokens) and trained answer tokens of the pieces made."""

    kept: int
    cut: int
    skipped: int
    tokens: int
    answer_tokens: int
    piece_lengths: tuple[int, ...]

    def summary(self) -> str:
        return (f"{self.kept + self.cut + self.skipped} dialogs: {self.kept} kept whole, {self.cut} cut "
                f"(oldest turns dropped to fit), {self.skipped} skipped (too long or nothing to train on); "
                f"{self.tokens} tokens, {self.answer_tokens} of them trained answers")


def scan(source, encoder: DialogPieces) -> DialogCounts:
    """Encode every dialog of `source` once and count what happened to each."""
    outcomes: collections.Counter = collections.Counter()
    lengths: list[int] = []
    answer_tokens = 0
    for index in range(len(source)):
        pieces, outcome = encoder.encode(example_messages(source[index]))
        outcomes[outcome] += 1
        for piece in pieces:
            lengths.append(len(piece["inputs"]))
            answer_tokens += int(piece["loss_weights"].sum())
    return DialogCounts(outcomes[KEPT], outcomes[CUT], outcomes[SKIPPED], sum(lengths), answer_tokens,
                        tuple(lengths))
