"""Next-token pieces: what pretraining and fine-tuning feed the packer.

A sequence of token ids with a weight on each token becomes `inputs = tokens[:-1]`,
`targets = tokens[1:]` and `loss_weights = weights[1:]` (the weight of predicting each target), cut
into chunks of at most seq_len predictions: long documents are split, never cut off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llama2_jax.data.batch import BatchSpec, Piece, packed_spec
from llama2_jax.data.tokenizer import Tokenizer

NEXT_TOKEN_FIELDS = {"inputs": "int32", "targets": "int32", "loss_weights": "float32"}


def next_token_spec(seq_len: int) -> BatchSpec:
    """Packed rows of `inputs`, `targets`, `loss_weights`, `positions` and `segment_ids`."""
    return packed_spec(seq_len, NEXT_TOKEN_FIELDS, weight_field="loss_weights")


def next_token_pieces(tokens: np.ndarray, weights: np.ndarray, seq_len: int) -> list[Piece]:
    """`tokens` and per-token `weights` -> chunks of at most `seq_len` predictions."""
    inputs, targets = tokens[:-1].astype(np.int32), tokens[1:].astype(np.int32)
    target_weights = weights[1:].astype(np.float32)
    return [{"inputs": inputs[start:start + seq_len], "targets": targets[start:start + seq_len],
             "loss_weights": target_weights[start:start + seq_len]}
            for start in range(0, len(inputs), seq_len)]


class DocumentChunks:
    """A text record (its `field` holds the text) -> BOS + tokens + EOS, every prediction weighted 1,
    in chunks of seq_len."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, field: str = "text"):
        self.tokenizer, self.seq_len, self.field = tokenizer, seq_len, field

    def __call__(self, example: Any) -> list[Piece]:
        text = example[self.field]
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return self.pieces(np.asarray(self.tokenizer.encode(text, bos=True, eos=True), np.int32))

    def pieces(self, tokens: np.ndarray) -> list[Piece]:
        """A document's token ids, already framed by BOS and EOS, in chunks (pre-tokenizing uses this)."""
        return next_token_pieces(tokens, np.ones(len(tokens), np.float32), self.seq_len)


def unigram_entropy(source, encoder, vocab_size: int, tokens: int = 200_000) -> float:
    """Entropy (nats per token) of the target-token frequencies in about `tokens` targets of
    `source`'s examples, taken in a fixed random order: the loss of the best model that ignores
    context, the line a language model must go far below."""
    counts = np.zeros(vocab_size)
    seen = 0
    for index in np.random.default_rng(0).permutation(len(source)):
        for piece in encoder(source[index]):
            np.add.at(counts, piece["targets"], piece["loss_weights"])
            seen += len(piece["targets"])
        if seen >= tokens:
            break
    probabilities = counts[counts > 0] / counts.sum()
    return float(-np.sum(probabilities * np.log(probabilities)))
