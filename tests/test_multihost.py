"""Two JAX processes on this machine, four CPU devices each, training through one mesh: exact resume
on as many processes; on pre-tokenized data the batches, the losses and the checkpoints of one
process; a SIGTERM to one of them stops both at one step."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llama2_jax import config_cli
from llama2_jax.data import Tokenizer, sources, tokenized
from llama2_jax.distributed import RESUMABLE_EXIT_STATUS
from llama2_jax.stages import pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train_two_processes(workdir: pathlib.Path, steps: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    command = [
        "bash", str(REPO / "launch/local_multihost.sh"), "2", "4", "--",
        sys.executable, "-m", "llama2_jax", "train", "--config=configs/pretrain.py:tiny",
        f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.log_every=1",
        "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
        "--config.train.sample_length=0", "--config.optimizer.decay_steps=6",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "[process 0]" in output and "[process 1]" in output  # both joined, both exited 0
    return output


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_resume_exactly_where_they_stopped(tmp_path):
    """6 steps in one run equal 4 steps, a restart, and 2 more: each process restores its own
    data position from the shared checkpoint."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_two_processes(straight, steps=6)
    _train_two_processes(resumed, steps=4)
    assert (resumed / "checkpoints" / "4").is_dir()
    assert sorted(p.name for p in (resumed / "checkpoints" / "4" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"
    ]
    _train_two_processes(resumed, steps=6)
    assert sorted(_losses(straight)) == [1, 2, 3, 4, 5, 6]
    assert _losses(resumed) == _losses(straight)


# Pre-tokenized data: rows read by global index, the same batches for one process or two.
STEPS = 30
# float32 on CPU: one process and two sum the gradients in another order. Seen: 1.2e-7 relative over
# 6 steps, 2.9e-6 at the end of 5 + 25 steps; other data differs by ~1e-3 already at step 1.
TOLERANCE = 1e-4


def _tokenized_flags(tokenized_dir: pathlib.Path, steps: int, **train) -> list[str]:
    train = {"steps": steps, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 20, "eval_every": 0,
             "sample_length": 0, "seq_len": 64, **train}
    return [f"--config={REPO / 'configs/pretrain.py'}:tiny", f"--config.data.tokenized_dir={tokenized_dir}",
            f"--config.optimizer.decay_steps={STEPS}", *(f"--config.train.{key}={value}" for key, value in train.items())]


def _train_one_process(flags: list[str], workdir: pathlib.Path) -> None:
    """In this test process: one process, conftest's eight CPU devices."""
    config, _ = config_cli.parse_config_flags(flags)
    pretrain.run(config, str(workdir))


def _start_two_processes(flags: list[str], workdir: pathlib.Path) -> list[subprocess.Popen]:
    """What launch/local_multihost.sh 2 4 starts, each process's output in workdir/process_N.log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
        with open(workdir / f"process_{index}.log", "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "llama2_jax", "train", *flags, f"--workdir={workdir}"], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT))
    return processes


def _finish(processes: list[subprocess.Popen]) -> list[int]:
    try:
        return [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def _log(workdir: pathlib.Path, index: int) -> str:
    return (workdir / f"process_{index}.log").read_text()


def _train_two_processes_on_tokens(flags: list[str], workdir: pathlib.Path) -> None:
    statuses = _finish(_start_two_processes(flags, workdir))
    assert statuses == [0, 0], _log(workdir, 0)[-6000:] + _log(workdir, 1)[-3000:]


def _copy_checkpoint(source: pathlib.Path, step: int, destination: pathlib.Path) -> None:
    shutil.copytree(source / "checkpoints" / str(step), destination / "checkpoints" / str(step))


def _assert_close(got: dict[int, float], expected: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    np.testing.assert_allclose([got[step] for step in steps], [expected[step] for step in steps], rtol=TOLERANCE)


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("tokens")
    tokenized.write_tokenized(sources.bundled_dataset(), Tokenizer(), root, seq_len=64)
    return root


@pytest.fixture(scope="module")
def one_process_run(tokenized_dir, tmp_path_factory) -> pathlib.Path:
    """One process with eight devices, STEPS steps, a checkpoint every 3."""
    workdir = tmp_path_factory.mktemp("one_process")
    _train_one_process(_tokenized_flags(tokenized_dir, STEPS), workdir)
    return workdir


def test_two_processes_train_on_the_batches_of_one_which_resumes_their_checkpoint(
        tokenized_dir, one_process_run, tmp_path):
    two = tmp_path / "two"
    _train_two_processes_on_tokens(_tokenized_flags(tokenized_dir, 6), two)
    _assert_close(_losses(two), _losses(one_process_run), range(1, 7))
    resumed = tmp_path / "resumed_by_one"
    _copy_checkpoint(two, 3, resumed)
    _train_one_process(_tokenized_flags(tokenized_dir, 6), resumed)
    _assert_close(_losses(resumed), _losses(one_process_run), range(4, 7))


def test_two_processes_resume_the_checkpoint_of_one(tokenized_dir, one_process_run, tmp_path):
    resumed = tmp_path / "resumed_by_two"
    _copy_checkpoint(one_process_run, 3, resumed)
    _train_two_processes_on_tokens(_tokenized_flags(tokenized_dir, 6), resumed)
    _assert_close(_losses(resumed), _losses(one_process_run), range(4, 7))


def test_sigterm_to_one_process_stops_both_at_one_step_between_logs_and_the_run_resumes(
        tokenized_dir, one_process_run, tmp_path):
    workdir = tmp_path / "preempted"
    # Neither logs nor periodic checkpoints: the only checkpoint is the one the stop saves.
    processes = _start_two_processes(
        _tokenized_flags(tokenized_dir, STEPS, log_every=1000, checkpoint_every=1000), workdir)
    deadline = time.monotonic() + 240
    while "compiled and ran the first step" not in _log(workdir, 0):
        assert time.monotonic() < deadline and processes[0].poll() is None, _log(workdir, 0)[-6000:]
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)  # a preemption notice to the second host only
    statuses = _finish(processes)
    assert statuses == [RESUMABLE_EXIT_STATUS] * 2, _log(workdir, 0)[-6000:] + _log(workdir, 1)[-3000:]
    stops = [re.findall(r"saves a checkpoint at step (\d+)", _log(workdir, index)) for index in range(2)]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    stopped_at = int(stops[0][0])
    assert 1 < stopped_at < STEPS
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(stopped_at)]
    # One process resumes what two saved, to the losses of the uninterrupted run.
    _train_one_process(_tokenized_flags(tokenized_dir, STEPS), workdir)
    _assert_close(_losses(workdir), _losses(one_process_run), range(stopped_at + 1, STEPS + 1))
