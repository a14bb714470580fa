"""The log-likelihood a language model gives chosen tokens of many sequences, batched on its mesh.

Each sequence is token ids with a weight per predicted token (weight i belongs to token i + 1): the
result is, per sequence, the weighted sum of log p(token | tokens before it) and the weight's sum.
Sequences are sorted by length and right-padded, in batches whose length is a power of two (at
most the model's context), so a stream of inputs reuses a few compiled programs.
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
from llama2_jax.generate import bucket, model_mesh, to_host
from llama2_jax.train.losses import cross_entropy_terms

MIN_LENGTH_BUCKET = 16


def batches_by_length(lengths: Sequence[int], batch_size: int, shards: int) -> tuple[int, list[list[int]]]:
    """(rows, batches of indices): `batch_size` rounded up to a multiple of the batch shards, and the
    indices sorted by length in batches of that many, so every batch has the same number of rows."""
    rows = -(-batch_size // shards) * shards
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return rows, [order[start:start + rows] for start in range(0, len(order), rows)]


def length_bucket(longest: int, context: int) -> int:
    """A batch's padded length: a power of two at or above `longest`, at most the model's context."""
    return min(context, bucket(longest, MIN_LENGTH_BUCKET))


def place_rows(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """The same host arrays on every process, as global arrays split over the batch shards."""
    where = sharding.batch_sharding(mesh, rules)
    return {name: jax.make_array_from_callback(array.shape, where, lambda index, array=array: array[index])
            for name, array in batch.items()}


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
    from llama2_jax.metrics import Progress

    sequences = [np.asarray(tokens, np.int32) for tokens in sequences]
    weights = [np.asarray(weight, np.float32) for weight in weights]
    context = model.config.max_seq_len
    for index, (tokens, weight) in enumerate(zip(sequences, weights)):
        if not 2 <= len(tokens) <= context + 1 or len(weight) != len(tokens) - 1:
            raise ValueError(f"sequence {index}: {len(tokens)} tokens and {len(weight)} weights; a sequence needs "
                             f"2 to {context + 1} tokens and one weight per predicted token")
    mesh = mesh or model_mesh(model)
    rules = sharding.DEFAULT_RULES if rules is None else rules
    rows, batches = batches_by_length([len(tokens) for tokens in sequences], batch_size,
                                      sharding.batch_shard_count(mesh, rules))
    graphdef, state = nnx.split(model)
    totals, counts = np.zeros(len(sequences)), np.zeros(len(sequences))
    progress = Progress(len(sequences), unit="sequence")
    with sharding.logical_context(mesh, rules):
        for done, indices in enumerate(batches, start=1):
            length = length_bucket(max(len(sequences[index]) - 1 for index in indices), context)
            batch = _batch([sequences[i] for i in indices], [weights[i] for i in indices], length, rows)
            sums, weight_sums = _sums(graphdef, state, **place_rows(batch, mesh, rules))
            totals[indices] = to_host(sums)[:len(indices)]
            counts[indices] = to_host(weight_sums)[:len(indices)]
            progress.update(min(done * rows, len(sequences)))
    progress.close()
    return totals, counts
