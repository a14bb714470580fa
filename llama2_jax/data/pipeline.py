"""grain loading: shard per host, shuffle, tokenize, split long documents, pack, batch, global arrays.

    documents (this host's share) -> shuffle(seed), reshuffled each epoch -> tokenize
      -> chunks of at most seq_len (inputs = tokens[:-1], targets = tokens[1:])
      -> first-fit packing (segment ids 1, 2, ... per chunk, 0 on padding; positions restart at 0)
      -> local batch -> jax.make_array_from_process_local_data (batch axis over ("data", "fsdp"))

The tokenize step is pluggable: any function from an example to {"tokens": int32[L],
"loss_weights": float32[L]} (loss_weights[i] weighs the prediction of tokens[i]; SFT zeroes the
prompt). Every token of every document lands in exactly one packed row; nothing is cut off.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llama2_jax import sharding as sharding_lib
from llama2_jax.data import sources, tokenized
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer

BATCH_FIELDS = ("inputs", "targets", "loss_weights", "positions", "segment_ids")
TokenizeFn = Callable[[dict[str, Any]], dict[str, np.ndarray]]


class TextTokenizeFn:
    """Example with a text field -> BOS + tokens + EOS, every prediction weighted 1."""

    def __init__(self, tokenizer: Tokenizer, field: str = "text"):
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        text = example[self.field]
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        tokens = np.asarray(self.tokenizer.encode(text, bos=True, eos=True), np.int32)
        return {"tokens": tokens, "loss_weights": np.ones(len(tokens), np.float32)}


def pretokenized_example(example: np.ndarray) -> dict[str, np.ndarray]:
    """The tokenize step for datasets written by `data tokenize` (already BOS ... EOS)."""
    return {"tokens": example, "loss_weights": np.ones(len(example), np.float32)}


class SplitIntoChunks(grain.experimental.FlatMapTransform):
    """A tokenized document -> (inputs, targets, loss_weights) chunks of at most seq_len."""

    max_fan_out = 1_000_000  # long documents are split, never cut: no real limit on the count

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens, weights = document["tokens"], document["loss_weights"]
        inputs, targets, target_weights = tokens[:-1], tokens[1:], weights[1:].astype(np.float32)
        return [
            {"inputs": inputs[start:start + self.seq_len], "targets": targets[start:start + self.seq_len],
             "loss_weights": target_weights[start:start + self.seq_len]}
            for start in range(0, len(inputs), self.seq_len)
        ]


def _to_batch_fields(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "loss_weights": packed["loss_weights"].astype(np.float32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
    }


def load_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by data.tokenizer_path (empty: the bundled one)."""
    return Tokenizer(data_config.tokenizer_path or None)


def open_documents(data_config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer):
    """(random-access source, its default tokenize function) for `split` as `data_config` says."""
    if data_config.pretokenize or data_config.tokenized_dir:
        source = tokenized.open_split(data_config, split, tokenizer)
        return source, pretokenized_example
    builder = open_builder(data_config)
    return sources.data_source(builder, split), TextTokenizeFn(tokenizer, "text")


def open_builder(data_config: ml_collections.ConfigDict):
    """The tfds builder named by the config: local files (built on first use), or a prepared dataset."""
    if data_config.paths:
        return sources.build_local_dataset(
            data_config.dataset, list(data_config.paths), format=data_config.format,
            data_dir=data_config.data_dir or None, text_field=data_config.text_field,
            document_chars=data_config.document_chars, holdout_fraction=data_config.holdout_fraction,
            skip_bad_lines=data_config.skip_bad_lines)
    return sources.prepared_dataset(data_config.dataset, data_config.data_dir or None)


def host_documents(source, *, seed: int, process_index: int, process_count: int,
                   num_epochs: int | None, shuffle: bool = True) -> grain.MapDataset:
    """This host's share of the documents (every process_count-th one), shuffled anew each epoch."""
    documents = grain.MapDataset.source(source)[process_index::process_count]
    if len(documents) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no documents: the dataset has "
                        f"only {len(source)}; use more data or fewer hosts")
    if shuffle:
        documents = documents.shuffle(seed=seed)
    return documents.repeat(num_epochs)


def local_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seq_len: int,
                  local_batch_size: int, seed: int, split: str = "train", num_epochs: int | None = None,
                  process_index: int = 0, process_count: int = 1,
                  tokenize_fn: TokenizeFn | None = None) -> tuple[grain.IterDataset, int]:
    """The grain dataset of this host's packed numpy batches, and its number of documents per epoch.

    `num_epochs` None repeats forever; a finite count ends with a partial batch (padded later).
    """
    source, default_tokenize = open_documents(data_config, split, tokenizer)
    documents = host_documents(source, seed=seed, process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs, shuffle=data_config.shuffle)
    read_options = grain.ReadOptions(num_threads=data_config.worker_threads,
                                     prefetch_buffer_size=data_config.prefetch_documents)
    chunks = grain.experimental.FlatMapIterDataset(
        documents.map(tokenize_fn or default_tokenize).to_iter_dataset(read_options), SplitIntoChunks(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct={"inputs": seq_len, "targets": seq_len, "loss_weights": seq_len},
        num_packing_bins=data_config.packing_bins or max(local_batch_size, 16), seed=seed,
        shuffle_bins=data_config.shuffle)
    batches = packed.map(_to_batch_fields).batch(local_batch_size, drop_remainder=False)
    if data_config.prefetch_batches > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=data_config.prefetch_batches)
    return batches, len(source) // process_count + (process_index < len(source) % process_count)


class Batches(Iterator[dict[str, jax.Array]]):
    """Global training batches; its position saves and restores with the train state.

    Save:    ocp.args.Composite(..., data=batches.save_args())
    Restore: ocp.args.Composite(..., data=batches.restore_args()) (restores in place)
    """

    def __init__(self, dataset: grain.IterDataset, *, documents_per_epoch: int, seq_len: int,
                 global_batch_size: int, local_batch_size: int, sharding: jax.sharding.Sharding | None,
                 finite: bool):
        # Held in a list so that at exit the iterator can be closed and dropped while the modules its
        # threads use still exist (grain's own cleanup at interpreter teardown fails noisily).
        self._iterator_holder = [iter(dataset)]
        weakref.finalize(self, _close_iterators, self._iterator_holder)
        self.documents_per_epoch = documents_per_epoch
        self.global_shape = (global_batch_size, seq_len)
        self.local_batch_size, self.seq_len = local_batch_size, seq_len
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
        batch = _pad_rows(batch, self.local_batch_size, self.seq_len)
        if not self._checked_first_batch:
            if not np.any(batch["loss_weights"]):
                raise DataError("the first batch has no tokens to train on; check the dataset and tokenizer")
            self._checked_first_batch = True
        return batch

    def __next__(self) -> dict[str, jax.Array]:
        local = self.next_local()
        if self.sharding is None:
            return local
        return {name: jax.make_array_from_process_local_data(self.sharding, array, self.global_shape)
                for name, array in local.items()}

    @property
    def epoch(self) -> float:
        """Epochs of documents read so far on this host (counts documents already read ahead)."""
        return _next_document_index(self.grain_iterator.get_state()) / self.documents_per_epoch

    def get_state(self) -> dict[str, Any]:
        return self.grain_iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.grain_iterator.set_state(state)

    def save_args(self):
        """orbax args that write this iterator's position (one JSON file per process)."""
        return grain.checkpoint.CheckpointSave(self.grain_iterator)

    def restore_args(self):
        """orbax args that restore this iterator's position in place."""
        return grain.checkpoint.CheckpointRestore(self.grain_iterator)


def _close_iterators(holder: list) -> None:
    for iterator in holder:
        iterator.close()
    holder.clear()


def _pad_rows(batch: dict[str, np.ndarray], rows: int, seq_len: int) -> dict[str, np.ndarray]:
    missing = rows - len(batch["inputs"])
    if missing == 0:
        return batch
    return {name: np.concatenate([array, np.zeros((missing, seq_len), array.dtype)])
            for name, array in batch.items()}


def _next_document_index(state: Any) -> int:
    # The document source's iterator keeps "next_index"; the stages above it nest its state.
    if isinstance(state, dict):
        if "next_index" in state:
            return int(state["next_index"])
        for value in state.values():
            found = _next_document_index(value)
            if found >= 0:
                return found
    return -1


def make_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seq_len: int,
                 global_batch_size: int, mesh: Mesh | None, seed: int, split: str = "train",
                 num_epochs: int | None = None, tokenize_fn: TokenizeFn | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 rules=sharding_lib.DEFAULT_RULES) -> Batches:
    """Global batches {inputs, targets, loss_weights, positions, segment_ids}, each [B, T], for `split`.

    Each JAX process reads 1/process_count of the documents and makes global_batch_size/process_count
    rows; with `mesh` the rows become global jax.Arrays sharded over ("data", "fsdp"), without it
    the iterator yields this host's numpy batch. `data_config.seed` >= 0 overrides `seed`.
    `num_epochs` None repeats forever (training); 1 gives one pass (evaluation), the last batch
    padded with weight-0 rows, all hosts stopping together.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {process_count} "
                         "processes; change train.global_batch_size")
    local_batch_size = global_batch_size // process_count
    seed = data_config.seed if data_config.seed >= 0 else seed
    dataset, documents = local_batches(
        data_config, tokenizer, seq_len=seq_len, local_batch_size=local_batch_size, seed=seed, split=split,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count,
        tokenize_fn=tokenize_fn)
    sharding = sharding_lib.batch_sharding(mesh, rules) if mesh is not None else None
    if sharding is not None:
        batch_shards = sharding_lib.batch_shard_count(mesh, rules)
        if global_batch_size % batch_shards:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by data x fsdp = "
                             f"{batch_shards} (the batch shards of mesh {dict(mesh.shape)}); change "
                             "train.global_batch_size or the mesh")
    return Batches(dataset, documents_per_epoch=documents, seq_len=seq_len,
                   global_batch_size=global_batch_size, local_batch_size=local_batch_size,
                   sharding=sharding, finite=num_epochs is not None)
