"""Two JAX processes restoring one checkpoint directory: when one of them cannot read the newest
step, both restore the step before it, and process 0 alone sets the bad step aside."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from coordinator_port import reserved_port

REPO = pathlib.Path(__file__).resolve().parents[1]

PROCESS = r"""
import json, logging, os, sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    os.environ["COORDINATOR"], num_processes=2, process_id=int(os.environ["PROCESS_ID"])
)
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from llama2_jax.checkpoint.manager import CheckpointManager


class Position:
    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


workdir, action = sys.argv[1], sys.argv[2]
mesh = jax.make_mesh((8,), ("x",))
sharding = NamedSharding(mesh, PartitionSpec("x"))
manager = CheckpointManager(workdir, keep=3)
if action == "save":
    for step in (10, 20):
        values = np.arange(64.0, dtype=np.float32).reshape(8, 8) + step
        weights = jax.make_array_from_callback((8, 8), sharding, lambda index: values[index])
        manager.save(step, {"w": weights}, Position(100 * jax.process_index() + step), {})
    manager.close()
else:
    position = Position()
    target = {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}
    step, state = manager.restore(target, position)
    rows = {int(shard.index[0].start): np.asarray(shard.data).tolist() for shard in state["w"].addressable_shards}
    print("RESULT " + json.dumps({"step": step, "position": position.position, "rows": rows}))
"""


def _run_two_processes(workdir: pathlib.Path, action: str) -> list[str]:
    with reserved_port() as port:
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            COORDINATOR=f"127.0.0.1:{port}",
        )
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", PROCESS, str(workdir), action],
                cwd=REPO,
                env={**env, "PROCESS_ID": str(index)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for index in range(2)
        ]
        try:  # processes that disagree on the step wait for each other until killed
            outputs = [process.communicate(timeout=120)[0] for process in processes]
        finally:
            for process in processes:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-6000:]
    return outputs


def _result(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def test_processes_agree_on_the_step_when_one_cannot_read_it(tmp_path):
    _run_two_processes(tmp_path, "save")
    # Only process 1 reads this file: process 0 alone would restore step 20.
    (tmp_path / "checkpoints" / "20" / "data" / "process_1-of-2.json").write_text("{damaged")
    outputs = _run_two_processes(tmp_path, "restore")

    results = [_result(output) for output in outputs]
    assert [r["step"] for r in results] == [10, 10]
    assert [r["position"] for r in results] == [10, 110]
    # Each process holds the rows of its devices, and they are step 10's (step 20's are each 10 more).
    step_10 = np.arange(64.0).reshape(8, 8) + 10
    for result in results:
        assert result["rows"]
        for start, rows in result["rows"].items():
            np.testing.assert_array_equal(rows, step_10[int(start):int(start) + len(rows)])
    assert sorted(int(start) for result in results for start in result["rows"]) == list(range(8))
    moved = tmp_path / "checkpoints_unreadable" / "20"
    assert moved.is_dir() and not (tmp_path / "checkpoints" / "20").exists()
    directory = tmp_path / "checkpoints"
    assert (
        f"checkpoint step 20 in {directory} is unreadable (another process could not read it); "
        f"restoring step 10; moved it to {moved}"
    ) in outputs[0]
    assert f"checkpoint step 20 in {directory} is unreadable (JSONDecodeError: " in outputs[1]
