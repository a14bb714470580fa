"""grain pipeline: packing invariants, per-host shards, exact resume (also through orbax), global arrays,
mixtures of sources."""

import collections
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.checkpoint.manager import CheckpointManager
from llama2_jax.data import DataError, Tokenizer, default_data_config, make_batches, open_split
from llama2_jax.data.batch import BatchSpec, Field
from llama2_jax.data.pipeline import Mixture, local_batches
from llama2_jax.data.text import DocumentChunks, next_token_pieces, next_token_spec

SEQ_LEN = 16
DOCUMENT_LENGTHS = [3, 9, 15, 16, 17, 40, 1, 5, 31, 2, 8, 12]  # tokens between BOS and EOS


def document_tokens(example):
    """Synthetic tokenizer: document d of length n -> [1, 1000d, ..., 1000d + n - 1, 2]."""
    document, length = map(int, example["text"].split())
    return np.array([1] + [1000 * document + index for index in range(length)] + [2], np.int32)


def encode_document(example):
    tokens = document_tokens(example)
    return next_token_pieces(tokens, np.ones(len(tokens), np.float32), SEQ_LEN)


def text_batches(config, tokenizer, *, seq_len, global_batch_size, mesh=None, seed=0, split="train",
                 num_epochs=None, **keywords):
    """Pretraining's batches: the bundled tokenizer's documents in chunks, packed."""
    return make_batches(config, open_split(config, split, kind="text"), next_token_spec(seq_len),
                        DocumentChunks(tokenizer, seq_len), global_batch_size=global_batch_size, mesh=mesh,
                        seed=seed, num_epochs=num_epochs, **keywords)


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    lines = [json.dumps({"text": f"{document} {length}"}) for document, length in enumerate(DOCUMENT_LENGTHS, 1)]
    (root / "docs.jsonl").write_text("\n".join(lines))
    config = default_data_config()
    config.dataset, config.paths, config.format = "synthetic", (str(root / "docs.jsonl"),), "jsonl"
    config.holdout_fraction = 0.0  # every document in train
    config.data_dir = str(root / "tfds")
    config.packing_bins = 4
    return config


@pytest.fixture(scope="module")
def shakespeare_config(tmp_path_factory):
    config = default_data_config()
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    return config


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def one_epoch(config, tokenizer, *, process_index=0, process_count=1, batch_size=3):
    dataset, _ = local_batches(config, open_split(config, "train", kind="text"), next_token_spec(SEQ_LEN),
                               encode_document, local_batch_size=batch_size, seed=7, num_epochs=1,
                               process_index=process_index, process_count=process_count)
    return list(dataset)


def segments(batches):
    """Every packed segment as (inputs, targets, weights, positions) over all rows of all batches."""
    found = []
    for batch in batches:
        for row in range(len(batch["inputs"])):
            segment_ids = batch["segment_ids"][row]
            assert np.all(batch["loss_weights"][row][segment_ids == 0] == 0)
            assert np.all(batch["inputs"][row][segment_ids == 0] == 0)
            for segment in np.unique(segment_ids[segment_ids > 0]):
                where = np.flatnonzero(segment_ids == segment)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a segment is contiguous"
                found.append(tuple(batch[name][row][where] for name in ("inputs", "targets", "loss_weights",
                                                                        "positions")))
    return found


def test_packing_puts_every_token_in_exactly_one_sequence(synthetic_config, tokenizer):
    batches = one_epoch(synthetic_config, tokenizer)
    assert all(batch["inputs"].shape[1] == SEQ_LEN for batch in batches)
    predicted = collections.Counter()
    for inputs, targets, weights, positions in segments(batches):
        assert np.array_equal(positions, np.arange(len(inputs))), "positions restart at 0 per segment"
        assert np.array_equal(inputs[1:], targets[:-1]), "targets are the inputs shifted by one"
        assert np.all(weights == 1)
        predicted.update(targets.tolist())
    expected = collections.Counter()
    for document, length in enumerate(DOCUMENT_LENGTHS, 1):
        expected.update(document_tokens({"text": f"{document} {length}"})[1:].tolist())
    assert predicted == expected  # each document's tokens once, long ones split, none dropped


def test_two_processes_see_disjoint_documents(synthetic_config, tokenizer):
    def documents_seen(process_index):
        return {int(token) // 1000 for batch in one_epoch(synthetic_config, tokenizer, process_index=process_index,
                                                          process_count=2)
                for token in batch["targets"].ravel() if token >= 1000}
    first, second = documents_seen(0), documents_seen(1)
    assert first and second and not first & second
    assert first | second == set(range(1, len(DOCUMENT_LENGTHS) + 1))


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_same_seed_same_batches_and_epochs_counted(shakespeare_config, tokenizer):
    first = text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, seed=3)
    second = text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, seed=3)
    other = text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, seed=4)
    assert_same_batches(take(first, 3), take(second, 3))
    assert not np.array_equal(next(first)["inputs"], next(other)["inputs"])
    epoch_before = first.epoch
    take(first, 300)
    assert first.epoch > epoch_before


def test_epochs_are_counted(synthetic_config, tokenizer):
    batches = make_batches(synthetic_config, open_split(synthetic_config, "train", kind="text"),
                           next_token_spec(SEQ_LEN), encode_document, global_batch_size=2, mesh=None, seed=0)
    take(batches, 60)  # about eight epochs of the synthetic documents, plus up to 64 documents read ahead
    assert 6 < batches.epoch < 8 + 64 / len(DOCUMENT_LENGTHS)


def test_resume_from_state_reproduces_next_batches(shakespeare_config, tokenizer):
    batches = text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4)
    take(batches, 5)
    state = batches.get_state()
    expected = take(batches, 4)
    resumed = text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)


def test_iterator_state_round_trips_through_a_training_checkpoint(shakespeare_config, tokenizer, tmp_path):
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batches = text_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh, seed=1)
    take(batches, 3)
    params = {"w": np.arange(4.0)}
    manager = CheckpointManager(str(tmp_path), keep=1)
    manager.save(3, params, batches, {"stage": "test"})
    manager.close()
    expected = take(batches, 3)
    resumed = text_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh, seed=1)
    step, restored = CheckpointManager(str(tmp_path), keep=1).restore(
        {"w": jax.ShapeDtypeStruct((4,), np.float64)}, resumed)
    assert step == 3
    np.testing.assert_array_equal(restored["w"], params["w"])
    assert_same_batches(take(resumed, 3), expected)


def test_global_arrays_are_sharded_over_data_and_fsdp(shakespeare_config, tokenizer):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batch = next(text_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh))
    assert set(batch) == {"inputs", "targets", "loss_weights", "positions", "segment_ids"}
    for name, array in batch.items():
        assert array.shape == (8, 32)
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    assert batch["loss_weights"].dtype == np.float32 and batch["inputs"].dtype == np.int32
    with pytest.raises(DataError, match="not divisible by the 4 batch shards"):
        text_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=6, mesh=mesh)


def test_one_pass_over_validation_holds_every_token_then_padding_rows(shakespeare_config, tokenizer):
    batches = list(text_batches(shakespeare_config, tokenizer, seq_len=256, global_batch_size=8, split="validation",
                                num_epochs=1))
    assert all(batch["inputs"].shape == (8, 256) for batch in batches)
    source = open_split(shakespeare_config, "validation", kind="text")
    expected = sum(len(tokenizer.encode(source[index]["text"].decode(), bos=True, eos=True)) - 1
                   for index in range(len(source)))
    assert sum(int(batch["loss_weights"].sum()) for batch in batches) == expected  # every held-out prediction
    rows = [row for batch in batches for row in zip(batch["segment_ids"], batch["loss_weights"])]
    used = [bool(segment_ids.any()) for segment_ids, _ in rows]
    # Padding rows (no segment, no weight) only fill up the very last batch.
    assert used == sorted(used, reverse=True) and used.index(False) > len(rows) - 8
    assert all(not weights.any() for (_, weights), is_used in zip(rows, used) if not is_used)


def test_bad_pipeline_inputs(shakespeare_config, synthetic_config, tokenizer):
    with pytest.raises(DataError, match="no split 'test'"):
        text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, split="test")
    with pytest.raises(DataError, match="gets no examples"):
        local_batches(synthetic_config, open_split(synthetic_config, "train", kind="text"),
                      next_token_spec(SEQ_LEN), encode_document, local_batch_size=1, seed=0,
                      process_index=20, process_count=21)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        text_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, process_index=0, process_count=3)
    no_weights = make_batches(
        synthetic_config, open_split(synthetic_config, "train", kind="text"), next_token_spec(SEQ_LEN),
        lambda example: next_token_pieces(np.array([1, 2], np.int32), np.zeros(2, np.float32), SEQ_LEN),
        global_batch_size=2, mesh=None, seed=0)
    with pytest.raises(DataError, match="nothing to train on"):
        next(no_weights)


def test_a_mixture_draws_in_proportion_and_its_epoch_is_one_pass_over_the_first_source():
    spec = BatchSpec({"value": Field((), "int32"), "weight": Field((), "float32", "ones")}, packed=False,
                     weight_field="weight")

    def encode(value):
        return [{"value": np.int32(value), "weight": np.float32(1)}]

    main, mixed_in = list(range(30)), list(range(1000, 1005))
    source = Mixture([main, mixed_in], [0.75, 0.25])
    assert len(source) == 40
    one_epoch = make_batches(default_data_config(), source, spec, encode, global_batch_size=8, mesh=None, seed=0,
                             num_epochs=1)
    values = np.concatenate([batch["value"][batch["weight"] > 0] for batch in one_epoch])
    assert sorted(values[values < 1000]) == main  # every example of the first source, once
    assert collections.Counter(values[values >= 1000]) == {value: 2 for value in mixed_in}  # cycled alongside
    endless = make_batches(default_data_config(), source, spec, encode, global_batch_size=8, mesh=None, seed=0)
    drawn = np.concatenate([next(endless)["value"] for _ in range(30)])
    assert np.mean(drawn >= 1000) == 0.25
