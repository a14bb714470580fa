"""grain pipeline: packing invariants, per-host shards, exact resume (also through orbax), global arrays."""

import collections
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.data import DataError, Tokenizer, default_data_config, make_batches
from llama2_jax.data.pipeline import local_batches

SEQ_LEN = 16
DOCUMENT_LENGTHS = [3, 9, 15, 16, 17, 40, 1, 5, 31, 2, 8, 12]  # tokens between BOS and EOS


def document_tokens(example):
    """Synthetic tokenize step: document d of length n -> [1, 1000d, ..., 1000d + n - 1, 2]."""
    document, length = map(int, example["text"].split())
    tokens = np.array([1] + [1000 * document + index for index in range(length)] + [2], np.int32)
    return {"tokens": tokens, "loss_weights": np.ones(len(tokens), np.float32)}


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    lines = [json.dumps({"text": f"{document} {length}"}) for document, length in enumerate(DOCUMENT_LENGTHS, 1)]
    (root / "docs.jsonl").write_text("\n".join(lines))
    config = default_data_config()
    config.dataset, config.paths, config.format = "synthetic", (str(root / "docs.jsonl"),), "jsonl"
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
    dataset, _ = local_batches(config, tokenizer, seq_len=SEQ_LEN, local_batch_size=batch_size, seed=7,
                               num_epochs=1, process_index=process_index, process_count=process_count,
                               tokenize_fn=document_tokens)
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
        expected.update(document_tokens({"text": f"{document} {length}"})["tokens"][1:].tolist())
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
    first = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=3)
    second = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=3)
    other = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=4)
    assert_same_batches(take(first, 3), take(second, 3))
    assert not np.array_equal(next(first)["inputs"], next(other)["inputs"])
    epoch_before = first.epoch
    take(first, 300)
    assert first.epoch > epoch_before


def test_epochs_are_counted(synthetic_config, tokenizer):
    batches = make_batches(synthetic_config, tokenizer, seq_len=SEQ_LEN, global_batch_size=2, mesh=None, seed=0,
                           tokenize_fn=document_tokens)
    take(batches, 60)  # about eight epochs of the synthetic documents, plus up to 64 documents read ahead
    assert 6 < batches.epoch < 8 + 64 / len(DOCUMENT_LENGTHS)


def test_resume_from_state_reproduces_next_batches(shakespeare_config, tokenizer):
    batches = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=0)
    take(batches, 5)
    state = batches.get_state()
    expected = take(batches, 4)
    resumed = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=0)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)


def test_iterator_state_round_trips_through_orbax_checkpoint(shakespeare_config, tokenizer, tmp_path):
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batches = make_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh, seed=1)
    take(batches, 3)
    params = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=batches.save_args()))
        manager.wait_until_finished()
    expected = take(batches, 3)
    resumed = make_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh, seed=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params), data=resumed.restore_args()))
    np.testing.assert_array_equal(restored["state"]["w"], params["w"])
    assert_same_batches(take(resumed, 3), expected)


def test_global_arrays_are_sharded_over_data_and_fsdp(shakespeare_config, tokenizer):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batch = next(make_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=8, mesh=mesh, seed=0))
    assert set(batch) == {"inputs", "targets", "loss_weights", "positions", "segment_ids"}
    for name, array in batch.items():
        assert array.shape == (8, 32)
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    assert batch["loss_weights"].dtype == np.float32 and batch["inputs"].dtype == np.int32
    with pytest.raises(ValueError, match="not divisible by data x fsdp"):
        make_batches(shakespeare_config, tokenizer, seq_len=32, global_batch_size=6, mesh=mesh, seed=0)


def test_one_pass_over_validation_pads_the_last_batch_and_stops(shakespeare_config, tokenizer):
    batches = list(make_batches(shakespeare_config, tokenizer, seq_len=256, global_batch_size=8, mesh=None,
                                seed=0, split="validation", num_epochs=1))
    assert all(batch["inputs"].shape == (8, 256) for batch in batches)
    predicted = sum(int(batch["loss_weights"].sum()) for batch in batches)
    assert predicted > 50_000  # the held-out plays' tokens, every one of them
    assert not batches[-1]["loss_weights"][-1].any() or predicted % (8 * 256)


def test_pretokenized_dataset_gives_the_same_batches(shakespeare_config, tokenizer):
    pretokenized = default_data_config()
    pretokenized.update(shakespeare_config)
    pretokenized.pretokenize = True
    on_the_fly = make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=5)
    from_tokens = make_batches(pretokenized, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=5)
    assert_same_batches(take(on_the_fly, 5), take(from_tokens, 5))


def test_bad_pipeline_inputs(shakespeare_config, synthetic_config, tokenizer, tmp_path):
    with pytest.raises(DataError, match="no split 'test'"):
        make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=0, split="test")
    with pytest.raises(DataError, match="gets no documents"):
        local_batches(synthetic_config, tokenizer, seq_len=SEQ_LEN, local_batch_size=1, seed=0,
                      process_index=20, process_count=21)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_batches(shakespeare_config, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=0,
                     process_index=0, process_count=3)
    no_tokens = make_batches(synthetic_config, tokenizer, seq_len=SEQ_LEN, global_batch_size=2, mesh=None, seed=0,
                             tokenize_fn=lambda example: {"tokens": np.array([1, 2], np.int32),
                                                          "loss_weights": np.zeros(2, np.float32)})
    with pytest.raises(DataError, match="no tokens to train on"):
        next(no_tokens)
    foreign = default_data_config()
    foreign.update(shakespeare_config)
    foreign.tokenized_dir = str(tmp_path / "nothing_here")
    with pytest.raises(DataError, match="holds no tokenized dataset"):
        make_batches(foreign, tokenizer, seq_len=64, global_batch_size=4, mesh=None, seed=0)
