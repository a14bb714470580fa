"""Checkpoint manager: keep-K, restore into another mesh, half-written and corrupt checkpoints."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.checkpoint.manager import CheckpointError, CheckpointManager
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


def _target(mesh, spec):
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())),
        "params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec))},
    }


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
    shutil.copytree(os.path.join(saved, "checkpoints", "30"), partial)
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


def test_corrupt_checkpoint_falls_back_naming_it(saved, caplog):
    for path in glob.glob(os.path.join(saved, "checkpoints", "30", "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as out:
                out.write(b"not a checkpoint")
    position = Position()
    with caplog.at_level(logging.WARNING):
        step, state = CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), position)
    assert step == 20 and position.position == 60
    np.testing.assert_array_equal(state["params"]["w"], np.arange(64.0).reshape(8, 8) + 20)
    assert os.path.join(saved, "checkpoints", "30") in caplog.text


def test_no_readable_checkpoint_is_a_clear_error(saved):
    for step in ("20", "30"):
        shutil.rmtree(os.path.join(saved, "checkpoints", step, "state", "d"), ignore_errors=True)
        for path in glob.glob(os.path.join(saved, "checkpoints", step, "state", "*")):
            if os.path.isfile(path):
                os.remove(path)
    with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
        CheckpointManager(saved, keep=2).restore(_target(_mesh(8, 1, 1), PartitionSpec()), Position())
    assert os.path.join(saved, "checkpoints", "20") in str(error.value)
