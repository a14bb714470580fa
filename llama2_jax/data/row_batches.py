"""Global batches read by row index from rows packed ahead of time (pre-tokenized text, tokenized.py).

    rows -> shuffled anew each epoch by grain's index shuffle (row g of the run is found from g alone)
      -> the batch of step n: rows n * B .. (n + 1) * B - 1 of the run
      -> each process reads the rows its devices hold under the batch sharding -> global jax.Arrays

The batch of a step is so a function of the rows, the seed and the step only: one process or many,
and any mesh, train on the same data. The position a checkpoint saves, the run's next row, is the same
on every process and resumes on any number of them.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from llama2_jax import sharding as sharding_lib
from llama2_jax.checkpoint.manager import SAME_ON_EVERY_PROCESS
from llama2_jax.data.batch import BatchSpec
from llama2_jax.data.pipeline import (
    close_iterators,
    global_arrays,
    global_batch_sharding,
)
from llama2_jax.data.records import DataError


def rows_of_this_process(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, each once, in the order
    jax.make_array_from_process_local_data lays a local batch onto them."""
    slices = {index[0].indices(global_batch_size)
              for index in sharding.addressable_devices_indices_map((global_batch_size,)).values()}
    return np.concatenate([np.arange(*bounds) for bounds in sorted(slices)])


class RowBatches(Iterator[dict[str, Any]]):
    """Global batches of `rows` (random access, already shuffled and repeated as the run reads them),
    `total_rows` of them (None: endless), with a position: `get_state()` / `set_state()`."""

    def __init__(self, rows: grain.MapDataset, spec: BatchSpec, *, global_batch_size: int,
                 local_rows: np.ndarray, sharding: jax.sharding.Sharding | None, rows_per_epoch: int,
                 total_rows: int | None, read_options: grain.ReadOptions):
        self.rows, self.spec = rows, spec
        self.global_batch_size, self.local_rows, self.sharding = global_batch_size, local_rows, sharding
        self.rows_per_epoch, self.total_rows, self.read_options = rows_per_epoch, total_rows, read_options
        self.next_row = 0
        # Held in a list so that at exit the iterator can be closed while its threads' modules exist.
        self._iterator_holder: list = []
        weakref.finalize(self, close_iterators, self._iterator_holder)
        self._start_reading()

    def _start_reading(self) -> None:
        close_iterators(self._iterator_holder)
        stop = sys.maxsize if self.total_rows is None else self.total_rows
        first_rows = grain.MapDataset.range(self.next_row, stop, self.global_batch_size)
        self._iterator_holder.append(iter(first_rows.map(self._local_batch).to_iter_dataset(self.read_options)))

    def _local_batch(self, first_row: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch that starts at `first_row`; rows past the end are padding."""
        padding = {name: values[0] for name, values in self.spec.empty_rows(1).items()}
        rows = [self.rows[int(index)] if self.total_rows is None or index < self.total_rows else padding
                for index in first_row + self.local_rows]
        return {name: np.stack([row[name] for row in rows]) for name in self.spec.fields}

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next batch, as numpy arrays."""
        batch = next(self._iterator_holder[0])  # StopIteration past the last row of a finite run
        self.next_row += self.global_batch_size
        return batch

    def __next__(self) -> dict[str, Any]:
        return global_arrays(self.next_local(), self.sharding, self.global_batch_size)

    @property
    def epoch(self) -> float:
        """Epochs of rows read so far (the same on every process)."""
        return self.next_row / self.rows_per_epoch

    def get_state(self) -> dict[str, Any]:
        return {"next_row": self.next_row, SAME_ON_EVERY_PROCESS: True}

    def close(self) -> None:
        """Stop the reading threads (also done when the iterator is garbage collected)."""
        close_iterators(self._iterator_holder)

    def set_state(self, state: dict[str, Any]) -> None:
        if "next_row" not in state:
            raise DataError("the checkpoint's data position is not a row of pre-tokenized data (the run was "
                            "trained on text tokenized on the fly); resume it with the same data settings")
        self.next_row = int(state["next_row"])
        self._start_reading()


def make_row_batches(data_config: ml_collections.ConfigDict, rows, spec: BatchSpec, *, global_batch_size: int,
                     mesh: Mesh | None, seed: int, num_epochs: int | None = None,
                     rules=sharding_lib.DEFAULT_RULES, process_index: int | None = None,
                     process_count: int | None = None) -> RowBatches:
    """Global batches of `spec` from `rows` (random-access rows of the spec's fields).

    With `mesh` each process reads the rows its devices hold and the batches are global jax.Arrays;
    without it the iterator yields this process's 1/process_count of each batch as numpy arrays.
    `data_config.seed` >= 0 overrides `seed`; `data_config.shuffle` shuffles rows anew each epoch.
    `num_epochs` None repeats forever (training); 1 gives one pass (evaluation), the last batch padded
    with weight-0 rows.
    """
    if mesh is not None:
        sharding = global_batch_sharding(mesh, rules, global_batch_size)
        local_rows = rows_of_this_process(sharding, global_batch_size)
    else:
        sharding = None
        local_rows = _contiguous_share(global_batch_size, jax.process_index() if process_index is None else process_index,
                                       jax.process_count() if process_count is None else process_count)
    dataset = grain.MapDataset.source(rows)
    if data_config.shuffle:
        dataset = dataset.shuffle(seed=data_config.seed if data_config.seed >= 0 else seed)
    read_options = grain.ReadOptions(num_threads=data_config.worker_threads if data_config.prefetch_batches else 0,
                                     prefetch_buffer_size=data_config.prefetch_batches)
    return RowBatches(dataset.repeat(num_epochs), spec, global_batch_size=global_batch_size, local_rows=local_rows,
                      sharding=sharding, rows_per_epoch=len(rows),
                      total_rows=None if num_epochs is None else len(rows) * num_epochs, read_options=read_options)


def _contiguous_share(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the {process_count} "
                        "processes; change train.global_batch_size")
    share = global_batch_size // process_count
    return np.arange(process_index * share, (process_index + 1) * share)
