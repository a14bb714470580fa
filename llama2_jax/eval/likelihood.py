"""The log-likelihood a language model gives chosen tokens of many sequences, batched on its mesh.

Each sequence is token ids with a weight per predicted token (weight i belongs to token i + 1): the
result is, per sequence, the weighted sum of log p(token | tokens before it) and the weight's sum.
Sequences are right-padded in length-sorted batches (llama2_jax/length_batches.py), so a stream of
inputs reuses a few compiled programs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import sharding
from llama2_jax.generate import model_mesh, to_host
from llama2_jax.length_batches import length_bucket, map_batches, place_rows
from llama2_jax.train.losses import cross_entropy_terms


@functools.partial(jax.jit, static_argnums=0)
def _sums(graphdef, state, inputs, targets, weights, segment_ids):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    log_z, target_logit = cross_entropy_terms(model(inputs, positions, segment_ids), targets)
    return jnp.sum(weights * (target_logit - log_z), axis=1), jnp.sum(weights, axis=1)


def _batch(sequences: Sequence[np.ndarray], weights: Sequence[np.ndarray], length: int, rows: int) -> dict:
    batch = {"inputs": np.zeros((rows, length), np.int32), "targets": np.zeros((rows, length), np.int32),
             "weights": np.zeros((rows, length), np.float32), "segment_ids": np.zeros((rows, length), np.int32)}
    for row, (tokens, weight) in enumerate(zip(sequences, weights)):
        predicted = len(tokens) - 1
        batch["inputs"][row, :predicted] = tokens[:-1]
        batch["targets"][row, :predicted] = tokens[1:]
        batch["weights"][row, :predicted] = weight
        batch["segment_ids"][row, :predicted] = 1
    return batch


def log_likelihoods(model: nnx.Module, sequences: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], *,
                    batch_size: int = 32, mesh: Mesh | None = None,
                    rules=None) -> tuple[np.ndarray, np.ndarray]:
    """(weighted log-likelihood sums, weight sums), float64 arrays in the input order; `rules`
    default to `sharding.DEFAULT_RULES`."""
    sequences = [np.asarray(tokens, np.int32) for tokens in sequences]
    weights = [np.asarray(weight, np.float32) for weight in weights]
    context = model.config.max_seq_len
    for index, (tokens, weight) in enumerate(zip(sequences, weights)):
        if not 2 <= len(tokens) <= context + 1 or len(weight) != len(tokens) - 1:
            raise ValueError(f"sequence {index}: {len(tokens)} tokens and {len(weight)} weights; a sequence needs "
                             f"2 to {context + 1} tokens and one weight per predicted token")
    mesh = mesh or model_mesh(model)
    rules = sharding.DEFAULT_RULES if rules is None else rules
    graphdef, state = nnx.split(model)

    def run(indices: list[int], rows: int):
        length = length_bucket(max(len(sequences[index]) - 1 for index in indices), context)
        batch = _batch([sequences[i] for i in indices], [weights[i] for i in indices], length, rows)
        sums, weight_sums = _sums(graphdef, state, **place_rows(batch, mesh, rules))
        return to_host(sums), to_host(weight_sums)

    totals, counts = map_batches([len(tokens) for tokens in sequences], run, dtypes=(np.float64, np.float64),
                                 batch_size=batch_size, mesh=mesh, rules=rules, unit="sequence")
    return totals, counts
