"""Decoding by recomputing the whole forward pass at every step: the reference for the KV-cache
sampler, and the margin by which every chosen token won.

Two separately compiled programs (another mesh, the cache against a full pass, another batch size)
agree on the logits only up to float rounding, so their tokens are equal only where no step is a
near-tie. `decode(...).margin` is the smallest lead of a chosen token's score over the runner-up's,
over every row and step: compare tokens exactly where it dwarfs the float error, and choose other
prompts or seeds where it does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Decoded:
    tokens: list[list[int]]  # the new tokens of each prompt
    log_probs: np.ndarray  # [prompts, new tokens]: log p(token | prefix) under the model, temperature 1
    margin: float  # the smallest lead of a chosen token's score over the next best, in logits


def full_forward_logits(model) -> Callable[[Sequence[int]], jax.Array]:
    """Logits at the last real token of a right-padded row: one compiled program for every length."""
    width = model.config.max_seq_len

    @jax.jit
    def last_logits(tokens, length):
        segment_ids = (jnp.arange(width) < length).astype(jnp.int32)[None]
        return model(tokens[None], segment_ids=segment_ids)[0, length - 1]

    def run(sequence):
        padded = np.zeros(width, np.int32)
        padded[: len(sequence)] = sequence
        return last_logits(jnp.asarray(padded), len(sequence))

    return run


def decode(model, prompts: Sequence[Sequence[int]], new_tokens: int, *, temperature: float = 0.0,
           seed: int = 0) -> Decoded:
    """Greedy decoding (temperature 0), or sampling at `temperature` with no top-k or top-p, as
    generate.generate documents it: row r draws step t with `jax.random.categorical` from the key
    fold_in(fold_in(key(seed), r), t). A token's score is then its logit / temperature plus the
    Gumbel noise categorical adds to it, and the token drawn is the one with the highest score."""
    logits_of = full_forward_logits(model)
    tokens, log_probs, margin = [], [], np.inf
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        row_key = jax.random.fold_in(jax.random.key(seed), row)
        for step in range(new_tokens):
            logits = logits_of(sequence).astype(jnp.float32)
            scores = logits
            if temperature > 0:
                key = jax.random.fold_in(row_key, step)
                scores = logits / temperature + jax.random.gumbel(key, logits.shape, jnp.float32)
                # The margin is only meaningful while categorical is the Gumbel-max draw it was.
                assert int(jax.random.categorical(key, logits / temperature)) == int(jnp.argmax(scores))
            best, runner_up = np.sort(np.asarray(scores))[-2:][::-1]
            margin = min(margin, float(best - runner_up))
            sequence.append(int(jnp.argmax(scores)))
            log_probs.append(float(jax.nn.log_softmax(logits)[sequence[-1]]))
        tokens.append(sequence[len(prompt):])
    return Decoded(tokens, np.array(log_probs, np.float32).reshape(len(prompts), new_tokens), margin)
