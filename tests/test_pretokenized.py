"""Pre-tokenized text: packed once into rows, read by global row index, so that the batch of a step and
the position a checkpoint saves are the same for any number of processes."""

import collections
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    IteratorStateHandler,
)
from llama2_jax.data import (
    DataError,
    Tokenizer,
    default_data_config,
    sources,
    tokenized,
)
from llama2_jax.data.batch import BatchSpec, Field
from llama2_jax.data.row_batches import make_row_batches
from llama2_jax.data.text import DocumentChunks, next_token_spec

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def tokenized_config(tmp_path_factory, tokenizer):
    """The bundled corpus's held-out split in rows of SEQ_LEN."""
    root = tmp_path_factory.mktemp("tokens")
    tokenized.write_tokenized(sources.bundled_dataset(), tokenizer, root, seq_len=SEQ_LEN, splits=["validation"])
    config = default_data_config()
    config.tokenized_dir = str(root)
    return config


def row_batches(config, tokenizer, *, global_batch_size=8, seed=3, num_epochs=None, mesh=None, **keywords):
    rows = tokenized.open_rows(config, "validation", tokenizer, SEQ_LEN)
    return make_row_batches(config, rows, next_token_spec(SEQ_LEN), global_batch_size=global_batch_size,
                            mesh=mesh, seed=seed, num_epochs=num_epochs, **keywords)


def take(batches, count):
    return [{name: np.asarray(array) for name, array in next(batches).items()} for _ in range(count)]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def pieces_of(row):
    """A packed row's pieces as (inputs, targets), checking the invariants of packing on the way."""
    found = []
    for segment in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
        where = np.flatnonzero(row["segment_ids"] == segment)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a piece is contiguous"
        assert np.array_equal(row["positions"][where], np.arange(len(where))), "positions restart per piece"
        assert np.all(row["loss_weights"][where] == 1)
        found.append((row["inputs"][where].tobytes(), row["targets"][where].tobytes()))
    padding = row["segment_ids"] == 0
    assert not row["loss_weights"][padding].any() and not row["inputs"][padding].any()
    return found


def test_rows_hold_every_piece_of_every_document_once(tokenized_config, tokenizer):
    rows = tokenized.open_rows(tokenized_config, "validation", tokenizer, SEQ_LEN)
    packed = collections.Counter(piece for index in range(len(rows)) for piece in pieces_of(rows[index]))
    source = sources.data_source(sources.bundled_dataset(), "validation")
    chunks = DocumentChunks(tokenizer, SEQ_LEN)
    expected = collections.Counter((piece["inputs"].tobytes(), piece["targets"].tobytes())
                                   for index in range(len(source)) for piece in chunks(source[index]))
    assert packed == expected  # long documents split as on the fly, nothing dropped or repeated
    metadata = json.loads((Path(tokenized_config.tokenized_dir) / tokenized.METADATA_FILE).read_text())
    split = metadata["splits"]["validation"]
    assert split["rows"] == len(rows) and split["predictions"] > 0.97 * len(rows) * SEQ_LEN  # little padding


def test_the_batch_of_a_step_does_not_depend_on_the_process_count(tokenized_config, tokenizer):
    one_process = take(row_batches(tokenized_config, tokenizer), 4)
    for count in (2, 4):
        shares = [take(row_batches(tokenized_config, tokenizer, process_index=index, process_count=count), 4)
                  for index in range(count)]
        assembled = [{name: np.concatenate([share[step][name] for share in shares]) for name in one_process[step]}
                     for step in range(4)]
        assert_same_batches(assembled, one_process)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    on_mesh = row_batches(tokenized_config, tokenizer, mesh=mesh)
    batch = next(on_mesh)
    assert batch["inputs"].sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    assert_same_batches([{name: np.asarray(array) for name, array in batch.items()}] + take(on_mesh, 3), one_process)
    other_seed = next(row_batches(tokenized_config, tokenizer, seed=4))
    assert not np.array_equal(other_seed["inputs"], one_process[0]["inputs"])


def test_a_position_saved_by_two_processes_resumes_in_one(tokenized_config, tokenizer, tmp_path):
    uninterrupted = take(row_batches(tokenized_config, tokenizer), 5)
    second_process = row_batches(tokenized_config, tokenizer, process_index=1, process_count=2)
    take(second_process, 3)
    resumed = row_batches(tokenized_config, tokenizer)
    resumed.set_state(second_process.get_state())
    assert_same_batches(take(resumed, 2), uninterrupted[3:])
    # Through a checkpoint whose positions two processes wrote.
    manager = CheckpointManager(str(tmp_path), keep=1)
    manager.save(3, {"w": np.zeros(2)}, second_process, {"stage": "test"})
    manager.close()
    data = tmp_path / "checkpoints" / "3" / "data"
    os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    resumed = row_batches(tokenized_config, tokenizer)
    step, _ = CheckpointManager(str(tmp_path), keep=1).restore({"w": jax.ShapeDtypeStruct((2,), np.float64)}, resumed)
    assert step == 3
    assert_same_batches(take(resumed, 2), uninterrupted[3:])


def test_a_position_of_text_tokenized_on_the_fly_is_refused(tokenized_config, tokenizer, tmp_path):
    batches = row_batches(tokenized_config, tokenizer)
    with pytest.raises(DataError, match="tokenized on the fly"):
        batches.set_state({"next_index": 12})
    data = tmp_path / "data"
    data.mkdir()
    (data / "process_0-of-2.json").write_text(json.dumps({"next_index": 12}))
    with pytest.raises(CheckpointError, match="resume with as many processes, or train on pre-tokenized data"):
        IteratorStateHandler().restore(data)


def test_each_epoch_reads_every_row_once_in_a_new_order():
    spec = BatchSpec({"row": Field((), "int32"), "weight": Field((), "float32", "ones")}, packed=False,
                     weight_field="weight")
    rows = [{"row": np.int32(index), "weight": np.float32(1)} for index in range(12)]
    batches = make_row_batches(default_data_config(), rows, spec, global_batch_size=4, mesh=None, seed=0)
    epochs = [np.concatenate([next(batches)["row"] for _ in range(3)]) for _ in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert batches.epoch == 3


def test_one_pass_reads_every_row_then_pads_the_last_batch(tokenized_config, tokenizer):
    rows = tokenized.open_rows(tokenized_config, "validation", tokenizer, SEQ_LEN)
    batches = list(row_batches(tokenized_config, tokenizer, global_batch_size=16, num_epochs=1))
    assert len(batches) == -(-len(rows) // 16)
    used = np.concatenate([batch["segment_ids"].any(axis=1) for batch in batches])
    assert used.sum() == len(rows) and not used[len(rows):].any()


def test_tokenized_directories_that_do_not_fit_are_refused(tokenized_config, tokenizer, tmp_path):
    with pytest.raises(DataError, match="rows of 64 tokens but train.seq_len is 128.*--seq-len 128"):
        tokenized.open_rows(tokenized_config, "validation", tokenizer, 128)
    with pytest.raises(DataError, match="no split 'train'"):
        tokenized.open_rows(tokenized_config, "train", tokenizer, SEQ_LEN)
    missing = default_data_config()
    missing.tokenized_dir = str(tmp_path / "nothing_here")
    with pytest.raises(DataError, match="holds no tokenized dataset"):
        tokenized.open_rows(missing, "validation", tokenizer, SEQ_LEN)
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / tokenized.METADATA_FILE).write_text(json.dumps({"dtype": "uint16", "splits": {}}))
    earlier = default_data_config()
    earlier.tokenized_dir = str(tmp_path / "documents")
    with pytest.raises(DataError, match="whole documents, not packed rows"):
        tokenized.open_rows(earlier, "validation", tokenizer, SEQ_LEN)
