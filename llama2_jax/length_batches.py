"""Many sequences through a model in length-sorted batches on its mesh: reward scoring
(llama2_jax/reward.py) and log-likelihoods (llama2_jax/eval/likelihood.py).

Sequences are sorted by length and cut into batches of one number of rows (the batch size rounded
up to a multiple of the mesh's batch shards), so each batch pads little; a batch is padded to a
power-of-two length at most the model's context, so a stream of inputs reuses a few compiled
programs. A batch's host arrays are the same on every process and become global arrays split over
the batch shards, so every process of a multi-host run must pass the same sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from llama2_jax import sharding
from llama2_jax.generate import bucket

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


def map_batches(lengths: Sequence[int], run: Callable[[list[int], int], Sequence[np.ndarray]], *,
                dtypes: Sequence[np.dtype], batch_size: int, mesh: Mesh, rules, unit: str) -> list[np.ndarray]:
    """`run(indices, rows)` on every length-sorted batch, inside the mesh and rules: it pads the
    sequences at `indices` to `rows` rows, runs the model and returns host arrays of one value per
    row, one array per entry of `dtypes`. Returns those values in the input order, one array each."""
    from llama2_jax.metrics import PROGRESS_LINE_SECONDS, Progress

    rows, batches = batches_by_length(lengths, batch_size, sharding.batch_shard_count(mesh, rules))
    outputs = [np.zeros(len(lengths), dtype) for dtype in dtypes]
    progress = Progress(len(lengths), unit=unit, line_seconds=PROGRESS_LINE_SECONDS)
    with sharding.logical_context(mesh, rules):
        for done, indices in enumerate(batches, start=1):
            for output, values in zip(outputs, run(indices, rows), strict=True):
                output[indices] = np.asarray(values)[:len(indices)]
            progress.update(min(done * rows, len(lengths)))
    progress.close()
    return outputs
