"""grain loading for every stage: shard per host, shuffle, encode, pack or pad, batch, global arrays.

    examples (this host's share) -> shuffle(seed), reshuffled each epoch (a `Mixture`: several
      sources, each so, drawn from in proportion)
      -> the task's encoder: one example -> zero or more pieces (an example it cannot use: none)
      -> packed (`BatchSpec.packed`): pieces of per-token arrays, first-fit packed into rows of
         seq_len; segment ids 1, 2, ... per piece and 0 on padding, positions restarting at 0
         padded: each piece already has a row's shape (the encoder pads it)
      -> local batch -> global jax.Arrays, the batch axis split as the rules place `batch`

A task declares its batch with a `BatchSpec` (batch.py): every field's shape per row and dtype. The
pipeline knows nothing else about the task: text, dialogs and preference pairs all go through it.

Each process packs its own share of the examples, so the rows of a step depend on the number of
processes: a run is exactly resumable on as many processes, not on another number. Pre-tokenized text
is packed ahead of time and read by global row index instead (row_batches.py), the same batches for
any number of processes.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llama2_jax import sharding as sharding_lib
from llama2_jax.data import sources
from llama2_jax.data.batch import PACKED_FIELDS, BatchSpec, Piece
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer

Encoder = Callable[[Any], list[Piece]]


def load_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by data.tokenizer_path (empty: the bundled one)."""
    return Tokenizer(data_config.tokenizer_path or None)


def open_split(data_config: ml_collections.ConfigDict, split: str, *, kind: str):
    """Random-access examples of `split`. `kind` is what the stage reads (`text`, `chat`,
    `preferences` or `prompts`); a dataset of another kind is an error naming the stage that reads
    it, and so is a dataset without the split, naming the setting that makes it (for local files,
    before they are built). (Pre-tokenized text is read as packed rows instead: tokenized.open_rows,
    row_batches.py.)"""
    sources.check_local_split(data_config, split)
    builder = sources.open_builder(data_config, kind)
    sources.check_kind(builder, kind)
    if split not in builder.info.splits:
        raise sources.missing_split(data_config, split, list(builder.info.splits))
    return sources.data_source(builder, split)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Example sources drawn from in proportion to `weights`, in grain's fixed interleaving
    (`MapDataset.mix`). An epoch is one pass over the first source; the others are cycled alongside,
    reshuffled at each of their own passes. Give one wherever a source is expected."""

    sources: Sequence[Any]
    weights: Sequence[float]

    def __len__(self) -> int:
        """Examples drawn in one epoch."""
        return round(len(self.sources[0]) * sum(self.weights) / self.weights[0])


def host_examples(source, *, seed: int, process_index: int, process_count: int,
                  num_epochs: int | None, shuffle: bool = True) -> grain.MapDataset:
    """This host's share of the examples (every process_count-th one), shuffled anew each epoch."""
    if isinstance(source, Mixture):
        parts = [host_examples(part, seed=seed + index, process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs if index == 0 else None, shuffle=shuffle)
                 for index, part in enumerate(source.sources)]
        return grain.MapDataset.mix(parts, source.weights)
    examples = grain.MapDataset.source(source)[process_index::process_count]
    if len(examples) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no examples: the dataset has "
                        f"only {len(source)}; use more data or fewer hosts")
    if shuffle:
        examples = examples.shuffle(seed=seed)
    return examples.repeat(num_epochs)


class _Encode(grain.experimental.FlatMapTransform):
    """The task's encoder as a grain flat-map: an example becomes any number of pieces."""

    max_fan_out = 1_000_000  # a long document becomes many chunks: no real limit on the count

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def flat_map(self, example: Any) -> list[Piece]:
        return self.encoder(example)


def _packed_row(spec: BatchSpec) -> Callable[[Piece], Piece]:
    per_token = [name for name in spec.fields if name not in PACKED_FIELDS]
    first = per_token[0]

    def to_fields(packed: Piece) -> Piece:
        row = {name: packed[name].astype(spec.fields[name].dtype) for name in per_token}
        row["positions"] = packed[f"{first}_positions"].astype(np.int32)
        row["segment_ids"] = packed[f"{first}_segment_ids"].astype(np.int32)
        return row

    return to_fields


def local_batches(data_config: ml_collections.ConfigDict, source, spec: BatchSpec, encoder: Encoder, *,
                  local_batch_size: int, seed: int, num_epochs: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> tuple[grain.IterDataset, int]:
    """The grain dataset of this host's numpy batches, and its number of examples per epoch.

    `num_epochs` None repeats forever; a finite count ends with a partial batch (padded later).
    """
    examples = host_examples(source, seed=seed, process_index=process_index, process_count=process_count,
                             num_epochs=num_epochs, shuffle=data_config.shuffle)
    read_options = grain.ReadOptions(num_threads=data_config.worker_threads,
                                     prefetch_buffer_size=data_config.prefetch_documents)
    pieces = grain.experimental.FlatMapIterDataset(examples.to_iter_dataset(read_options), _Encode(encoder))
    if spec.packed:
        seq_len = spec.fields[spec.weight_field].shape[0]
        packed_names = [name for name in spec.fields if name not in PACKED_FIELDS]
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct={name: seq_len for name in packed_names},
            num_packing_bins=packing_bins(data_config, local_batch_size), seed=seed,
            shuffle_bins=data_config.shuffle).map(_packed_row(spec))
    else:
        rows = pieces
    batches = rows.batch(local_batch_size, drop_remainder=False)
    if data_config.prefetch_batches > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=data_config.prefetch_batches)
    return batches, len(source) // process_count + (process_index < len(source) % process_count)


class Batches(Iterator[dict[str, jax.Array]]):
    """Global batches with a position: `get_state()` / `set_state()` (what a checkpoint saves)."""

    def __init__(self, dataset: grain.IterDataset, spec: BatchSpec, *, examples_per_epoch: int,
                 global_batch_size: int, local_batch_size: int, sharding: jax.sharding.Sharding | None,
                 finite: bool):
        # Held in a list so that at exit the iterator can be closed and dropped while the modules its
        # threads use still exist (grain's own cleanup at interpreter teardown fails noisily).
        self._iterator_holder = [iter(dataset)]
        weakref.finalize(self, close_iterators, self._iterator_holder)
        self.spec = spec
        self.examples_per_epoch = examples_per_epoch
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
        self.sharding, self.finite = sharding, finite
        self._checked_first_batch = False

    @property
    def grain_iterator(self) -> grain.DatasetIterator:
        return self._iterator_holder[0]

    def next_local(self) -> dict[str, np.ndarray]:
        """This host's next batch as numpy arrays (padded with weight-0 rows at the end of a finite run)."""
        try:
            batch = next(self.grain_iterator)
            exhausted = False
        except StopIteration:
            batch, exhausted = None, True
        if self.finite and self.sharding is not None and jax.process_count() > 1:
            # Hosts run out at different steps; stop only when all have, padding the early ones.
            exhausted = bool(np.all(multihost_utils.process_allgather(np.array(exhausted))))
        if exhausted:
            raise StopIteration
        batch = self._pad_rows(batch)
        if not self._checked_first_batch:
            if not np.any(batch[self.spec.weight_field]):
                raise DataError("the first batch has nothing to train on (every weight is 0); check the "
                                "dataset, the tokenizer and train.seq_len")
            self._checked_first_batch = True
        return batch

    def _pad_rows(self, batch: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if batch is None:
            return self.spec.empty_rows(self.local_batch_size)
        missing = self.local_batch_size - len(batch[self.spec.weight_field])
        if missing == 0:
            return batch
        padding = self.spec.empty_rows(missing)
        return {name: np.concatenate([batch[name], padding[name]]) for name in self.spec.fields}

    def __next__(self) -> dict[str, jax.Array]:
        local = self.next_local()
        return global_arrays(local, self.sharding, self.global_batch_size)

    @property
    def epoch(self) -> float:
        """Epochs of examples read so far on this host (counts examples already read ahead)."""
        return _next_example_index(self.grain_iterator.get_state()) / self.examples_per_epoch

    def get_state(self) -> dict[str, Any]:
        return self.grain_iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.grain_iterator.set_state(state)


def global_arrays(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding | None,
                  global_batch_size: int) -> dict[str, Any]:
    """This process's rows as parts of global jax.Arrays (without a sharding: the rows as they are)."""
    if sharding is None:
        return local
    return {name: jax.make_array_from_process_local_data(sharding, array, (global_batch_size, *array.shape[1:]))
            for name, array in local.items()}


def close_iterators(holder: list) -> None:
    for iterator in holder:
        iterator.close()
    holder.clear()


def _next_example_index(state: Any) -> int:
    # The example source's iterator keeps "next_index"; the stages above it nest its state.
    if isinstance(state, dict):
        if "next_index" in state:
            return int(state["next_index"])
        for value in state.values():
            found = _next_example_index(value)
            if found >= 0:
                return found
    return -1


def global_batch_sharding(mesh: Mesh, rules, global_batch_size: int) -> jax.sharding.Sharding:
    """How a global batch lies on `mesh`: its batch axis split as `rules` place `batch`."""
    batch_shards = sharding_lib.batch_shard_count(mesh, rules)
    if global_batch_size % batch_shards:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the {batch_shards} "
                        f"batch shards of mesh {dict(mesh.shape)}; change train.global_batch_size or the mesh")
    return sharding_lib.batch_sharding(mesh, rules)


def make_batches(data_config: ml_collections.ConfigDict, source, spec: BatchSpec, encoder: Encoder, *,
                 global_batch_size: int, mesh: Mesh | None, seed: int, num_epochs: int | None = None,
                 rules=sharding_lib.DEFAULT_RULES, process_index: int | None = None,
                 process_count: int | None = None) -> Batches:
    """Global batches of `spec` from `source`, each example turned into pieces by `encoder`.

    Each JAX process reads 1/process_count of the examples and makes global_batch_size/process_count
    rows; with `mesh` the rows become global jax.Arrays whose batch axis is split as `rules` place
    `batch`, without it the iterator yields this host's numpy batch. `data_config.seed` >= 0
    overrides `seed`. `num_epochs` None repeats forever (training); 1 gives one pass (evaluation),
    the last batch padded with weight-0 rows, all hosts stopping together.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the {process_count} "
                        "processes; change train.global_batch_size")
    sharding = None if mesh is None else global_batch_sharding(mesh, rules, global_batch_size)
    local_batch_size = global_batch_size // process_count
    seed = data_seed(data_config, seed)
    dataset, examples = local_batches(
        data_config, source, spec, encoder, local_batch_size=local_batch_size, seed=seed,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count)
    return Batches(dataset, spec, examples_per_epoch=examples, global_batch_size=global_batch_size,
                   local_batch_size=local_batch_size, sharding=sharding, finite=num_epochs is not None)


def packing_bins(data_config: ml_collections.ConfigDict, local_batch_size: int) -> int:
    """The first-fit packer's open rows: data.packing_bins, by default the local batch (at least 16)."""
    return data_config.packing_bins or max(local_batch_size, 16)


def data_seed(data_config: ml_collections.ConfigDict, seed: int) -> int:
    """The seed of shuffling and packing: data.seed when set (>= 0), else the stage's `seed`."""
    return data_config.seed if data_config.seed >= 0 else seed


def packed_rows(piece_lengths, seq_len: int, data_config: ml_collections.ConfigDict, local_batch_size: int,
                seed: int) -> int:
    """How many rows the first-fit packer makes of pieces of these lengths (in this order), packed
    as `local_batches` packs them: the rows of one epoch, which a stage trained by epochs turns into steps."""
    pieces = grain.MapDataset.source([{"inputs": np.zeros(length, np.int32)} for length in piece_lengths])
    rows = grain.experimental.FirstFitPackIterDataset(
        pieces.to_iter_dataset(), length_struct={"inputs": seq_len},
        num_packing_bins=packing_bins(data_config, local_batch_size), seed=data_seed(data_config, seed),
        shuffle_bins=False)
    return sum(1 for _ in rows)
