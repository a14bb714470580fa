"""Checkpoint manager: keep-K, restore into another mesh, half-written, corrupt and mismatched checkpoints."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.checkpoint import manager as manager_module
from llama2_jax.checkpoint.manager import CheckpointError, CheckpointManager, write_run_files
from llama2_jax.sharding import make_mesh


class Position:
    """The smallest resumable iterator."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def _mesh(data, fsdp, tensor):
    return make_mesh(dict(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor, dcn_data=1))


def _state(mesh, step):
    weights = jnp.arange(64.0).reshape(8, 8) + step
    return {
        "step": jnp.int32(step),
        "params": {"w": jax.device_put(weights, NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))},
    }


def _target(mesh, spec, shape=(8, 8), name="w"):
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())),
        "params": {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))},
    }


def _step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def _corrupt(workdir, step):
    """Every file of the step's saved state overwritten: what a damaged disk or bucket leaves."""
    for path in glob.glob(os.path.join(_step_dir(workdir, step), "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as out:
                out.write(b"not a checkpoint")


def _unreadable_dir(workdir):
    return os.path.join(workdir, "checkpoints_unreadable")


@pytest.fixture
def saved(tmp_path):
    """Steps 10, 20, 30 saved on a (2, 2, 2) mesh, keeping the last two."""
    mesh = _mesh(2, 2, 2)
    manager = CheckpointManager(str(tmp_path), keep=2)
    for step in (10, 20, 30):
        manager.save(step, _state(mesh, step), Position(step * 3), {"size": "toy"})
    manager.close()
    return str(tmp_path)


def test_keeps_the_last_k(saved):
    assert CheckpointManager(saved, keep=2).all_steps() == [20, 30]


def test_restores_into_another_mesh_with_the_data_position(saved):
    mesh = _mesh(1, 8, 1)
    position = Position()
    step, state = CheckpointManager(saved, keep=2).restore(_target(mesh, PartitionSpec("fsdp")), position)
    assert step == 30 and position.position == 90
    weights = state["params"]["w"]
    assert weights.sharding.spec == PartitionSpec("fsdp") and weights.sharding.mesh.shape["fsdp"] == 8
    np.testing.assert_array_equal(weights, np.arange(64.0).reshape(8, 8) + 30)


def test_half_written_checkpoint_is_ignored_and_cleaned(saved):
    # What a process killed mid-save leaves: an uncommitted temporary step directory.
    partial = os.path.join(saved, "checkpoints", "40.orbax-checkpoint-tmp")
    shutil.copytree(_step_dir(saved, 30), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    for path in glob.glob(os.path.join(partial, "state", "**", "*"), recursive=True)[::2]:
        if os.path.isfile(path):
            os.remove(path)
    manager = CheckpointManager(saved, keep=2)
    assert manager.latest_step() == 30
    step, _ = manager.restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert step == 30
    # The next save waits for orbax's removal of leftover temporary directories.
    manager.save(31, _state(_mesh(8, 1, 1), 31), Position(), {})
    manager.close()
    assert not os.path.exists(partial)


def test_corrupt_checkpoint_falls_back_is_moved_aside_and_training_goes_on(saved, caplog):
    _corrupt(saved, 30)
    mesh = _mesh(8, 1, 1)
    manager = CheckpointManager(saved, keep=2)
    position = Position()
    with caplog.at_level(logging.WARNING):
        step, state = manager.restore(_target(mesh, PartitionSpec()), position)
    assert step == 20 and position.position == 60
    np.testing.assert_array_equal(state["params"]["w"], np.arange(64.0).reshape(8, 8) + 20)

    moved = os.path.join(_unreadable_dir(saved), "30")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        (
            f"checkpoint step 30 in {os.path.join(saved, 'checkpoints')} is unreadable "
            "(JSONDecodeError: Expecting value: line 1 column 1 (char 0)); restoring step 20; "
            f"moved it to {moved}"
        )
    ]
    # Set aside whole, not deleted: its files are still there to inspect.
    assert os.path.isfile(os.path.join(moved, "state", "_METADATA"))
    assert manager.all_steps() == [20] and manager.latest_step() == 20

    # Training goes on through the bad step's number and past it; keep=2 counts readable steps only.
    for new_step in (25, 30, 40):
        assert manager.save(new_step, _state(mesh, new_step), Position(new_step), {})
    manager.close()
    reopened = CheckpointManager(saved, keep=2)
    assert reopened.all_steps() == [30, 40]
    assert sorted(os.listdir(_unreadable_dir(saved))) == ["30"]
    step, state = reopened.restore(_target(mesh, PartitionSpec()), Position(), step=30)
    np.testing.assert_array_equal(state["params"]["w"], np.arange(64.0).reshape(8, 8) + 30)


def test_a_step_that_goes_bad_twice_keeps_both_copies(saved):
    _corrupt(saved, 30)
    os.makedirs(os.path.join(_unreadable_dir(saved), "30"))  # set aside by an earlier run
    CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert sorted(os.listdir(_unreadable_dir(saved))) == ["30", "30.1"]


def test_unreadable_metadata_falls_back(saved):
    os.remove(os.path.join(_step_dir(saved, 30), "state", "_METADATA"))
    step, _ = CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert step == 20 and os.path.isdir(os.path.join(_unreadable_dir(saved), "30"))


def test_missing_data_position_falls_back(saved):
    shutil.rmtree(os.path.join(_step_dir(saved, 30), "data"))
    position = Position()
    step, _ = CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), position)
    assert step == 20 and position.position == 60


def test_a_state_of_another_shape_is_one_clear_error_without_fallback(saved):
    position = Position(7)
    with pytest.raises(CheckpointError) as error:
        CheckpointManager(saved, keep=2).restore(
            _target(_mesh(8, 1, 1), PartitionSpec(), shape=(8, 16)), position
        )
    message = str(error.value)
    assert "\n" not in message
    assert "checkpoint step 30" in message
    assert "params.w has shape (8, 8) in the checkpoint but (8, 16) in the state to restore" in message
    assert "resume with that config" in message and "new workdir" in message
    assert position.position == 7
    assert CheckpointManager(saved, keep=2).all_steps() == [20, 30]
    assert not os.path.exists(_unreadable_dir(saved))


def test_a_state_with_other_parameters_names_them(saved):
    # What a reward model's state meets in a language model's workdir: another head.
    with pytest.raises(CheckpointError, match=r"params\.score is not in the checkpoint \(and 1 more"):
        CheckpointManager(saved, keep=2).restore(
            _target(_mesh(8, 1, 1), PartitionSpec(), name="score"), Position()
        )
    assert not os.path.exists(_unreadable_dir(saved))


def test_positions_written_by_another_process_count_are_an_error_without_fallback(saved):
    data = os.path.join(_step_dir(saved, 30), "data")
    os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
    with pytest.raises(CheckpointError, match=r"different number of processes \(process_0-of-2.json\)"):
        CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert not os.path.exists(_unreadable_dir(saved))


def test_failures_other_than_unreadable_files_propagate(saved, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert CheckpointManager(saved, keep=2).all_steps() == [20, 30]


def test_a_single_process_needs_no_collectives(saved, monkeypatch):
    def collective(*args, **kwargs):
        raise AssertionError("a single process called a collective")

    monkeypatch.setattr(multihost_utils, "process_allgather", collective)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", collective)
    _corrupt(saved, 30)
    step, _ = CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert step == 20


def test_no_readable_checkpoint_is_a_clear_error_and_moves_nothing(saved):
    for step in (20, 30):
        _corrupt(saved, step)
    with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
        CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert "step 30 (JSONDecodeError" in str(error.value) and "step 20 (JSONDecodeError" in str(error.value)
    assert CheckpointManager(saved, keep=2).all_steps() == [20, 30]
    assert not os.path.exists(_unreadable_dir(saved))


def test_run_files_record_the_model_kind(tmp_path):
    write_run_files(str(tmp_path), {"a": 1}, {"dim": 8}, None, "reward")
    assert '"kind": "reward"' in (tmp_path / "model_config.json").read_text()
    with pytest.raises(ValueError, match="unknown model kind 'critic'"):
        write_run_files(str(tmp_path / "other"), {"a": 1}, {"dim": 8}, None, "critic")
    assert not (tmp_path / "other").exists()


def test_reasons_are_one_short_line():
    reason = manager_module._one_line(ValueError("NOT_FOUND: " + "x" * 1000 + "\nspec dump"))
    assert reason.startswith("ValueError: NOT_FOUND: xxx") and "\n" not in reason
    assert len(reason) == manager_module.MAX_REASON_CHARS


def test_a_step_that_was_never_saved_is_named(saved):
    with pytest.raises(CheckpointError, match=r"no checkpoint step 25 in .*; it has \[20, 30\]"):
        CheckpointManager(saved, keep=2).restore(
            _target(_mesh(8, 1, 1), PartitionSpec()), Position(), step=25
        )
