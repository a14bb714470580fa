"""Two JAX processes on this machine, four CPU devices each, training through one mesh: exact resume
on as many processes; the evaluation of one process on a split the two run out of at different
batches; a sample, and a generation's rows gathered on both; on pre-tokenized data the batches, the
losses and the checkpoints of one process; a SIGTERM to one of them stops both at one step."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama2_jax import config_cli
from llama2_jax.data import Tokenizer, sources, tokenized
from llama2_jax.data.pipeline import load_tokenizer, make_batches, open_split
from llama2_jax.data.text import DocumentChunks, next_token_spec
from llama2_jax.distributed import RESUMABLE_EXIT_STATUS
from llama2_jax.stages import pretrain

from coordinator_port import reserved_port

REPO = pathlib.Path(__file__).resolve().parents[1]


def _text_flags(steps: int, eval_every: int = 0, sample_length: int = 0) -> list[str]:
    """The tiny config on text tokenized as it is read, each process packing its own share;
    evaluations of the whole held-out split, without the multiple-choice task (for time)."""
    return [f"--config={REPO / 'configs/pretrain.py'}:tiny", f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.train.checkpoint_every=4",
            f"--config.train.eval_every={eval_every}", "--config.train.eval_steps=0", "--config.train.eval_tasks=()",
            f"--config.train.sample_length={sample_length}", "--config.optimizer.decay_steps=6"]


def _train_two_processes(workdir: pathlib.Path, flags: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    command = ["bash", str(REPO / "launch/local_multihost.sh"), "2", "4", "--",
               sys.executable, "-m", "llama2_jax", "train", *flags, f"--workdir={workdir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "[process 0]" in output and "[process 1]" in output  # both joined, both exited 0
    return output


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _evaluation(workdir: pathlib.Path, step: int) -> dict[str, float]:
    (found,) = [r for r in _records(workdir) if r["step"] == step and "eval_loss" in r]
    return found


def _local_batches_of_evaluation(flags: list[str], process_count: int) -> list[int]:
    """How many local batches each process packs of the held-out split."""
    config, _ = config_cli.parse_config_flags(flags)
    data, seq_len = config.data, config.train.seq_len
    source = open_split(data, data.eval_split, kind="text")
    chunks = DocumentChunks(load_tokenizer(data), seq_len)
    return [sum(1 for _ in make_batches(data, source, next_token_spec(seq_len), chunks,
                                        global_batch_size=config.train.global_batch_size, mesh=None,
                                        seed=config.train.seed, num_epochs=1, process_index=index,
                                        process_count=process_count))
            for index in range(process_count)]


def test_two_processes_resume_exactly_where_they_stopped_evaluate_as_one_and_sample(tmp_path):
    """6 steps in one run equal 4 steps, a restart, and 2 more: each process restores its own
    data position from the shared checkpoint. The run of 6 also evaluates the whole held-out split,
    which the two processes run out of at different batches, as one process does, and ends with the
    sample a pretraining run prints."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = _train_two_processes(straight, _text_flags(6, eval_every=6, sample_length=8))
    _train_two_processes(resumed, _text_flags(4))
    assert (resumed / "checkpoints" / "4").is_dir()
    assert sorted(p.name for p in (resumed / "checkpoints" / "4" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"
    ]
    _train_two_processes(resumed, _text_flags(6))
    assert sorted(_losses(straight)) == [1, 2, 3, 4, 5, 6]
    assert _losses(resumed) == _losses(straight)

    # Each process packs its own share of the documents: one runs out first and pads until both have.
    first, second = _local_batches_of_evaluation(_text_flags(6), process_count=2)
    assert first != second, "the held-out split no longer runs out unevenly; choose another seq_len"
    # Step 0: the initial weights, the same from the seed on one process as on two. No training step
    # in the run of one process, only that evaluation.
    one = tmp_path / "one"
    _train_one_process(_text_flags(0, eval_every=1), one)
    two_processes, one_process = _evaluation(straight, 0), _evaluation(one, 0)
    assert two_processes["eval_weight"] == one_process["eval_weight"]  # every prediction counted once
    # float32 sums over rows packed and added up in another order: seen 1e-7 relative.
    np.testing.assert_allclose(two_processes["eval_loss"], one_process["eval_loss"], rtol=1e-5)
    assert sorted(r["step"] for r in _records(straight) if "eval_loss" in r) == [0, 6]

    # Printed by process 0 alone: the tiny config's prompt and its continuation.
    printed = [[line.removeprefix(f"[process {index}] ") for line in output.splitlines()
                if line.startswith(f"[process {index}] ")] for index in (0, 1)]
    assert "--- sample ---" in printed[0] and "--- sample ---" not in printed[1], output[-3000:]
    text = printed[0][printed[0].index("--- sample ---") + 1]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:"), text


# Rows of a global array, four on each process, which generate.to_host and Generation.token_lists
# hand whole to both. (The sample above is one row, replicated on every device once sliced from the
# padded batch: its gather needs no other process's rows.)
GATHER = """
import json
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from llama2_jax import distributed, generate

distributed.initialize_from_environment()
rows = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))
tokens, lengths = (jax.make_array_from_callback(a.shape, rows, lambda index, a=a: a[index])
                   for a in (np.arange(8 * 3).reshape(8, 3), np.arange(8) % 4))
assert not tokens.is_fully_addressable and not tokens.is_fully_replicated
gathered = {"to_host": generate.to_host(tokens).tolist(),
            "token_lists": generate.Generation(tokens, tokens.astype(np.float32), lengths).token_lists()}
print("GATHERED " + json.dumps(gathered))
"""


def test_every_process_gets_every_row_of_a_generation(tmp_path):
    with reserved_port() as port:
        statuses = _finish(_start_two_processes(["-c", GATHER], tmp_path, port))
    assert statuses == [0, 0], _log(tmp_path, 0)[-3000:] + _log(tmp_path, 1)[-3000:]
    rows = np.arange(8 * 3).reshape(8, 3)
    expected = {"to_host": rows.tolist(), "token_lists": [row[:number % 4].tolist() for number, row in enumerate(rows)]}
    for index in (0, 1):
        (printed,) = re.findall(r"^GATHERED (.*)$", _log(tmp_path, index), re.MULTILINE)
        assert json.loads(printed) == expected


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


def _start_two_processes(arguments: list[str], workdir: pathlib.Path, port: int) -> list[subprocess.Popen]:
    """`python ARGUMENTS` as launch/local_multihost.sh 2 4 starts it (the coordinator on `port`, which
    the caller holds until they finish), each process's output in workdir/process_N.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
        with open(workdir / f"process_{index}.log", "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, *arguments], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
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
    with reserved_port() as port:
        statuses = _finish(_start_two_processes(["-m", "llama2_jax", "train", *flags, f"--workdir={workdir}"],
                                                workdir, port))
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


# `python -c HELD_RUN STEP train FLAGS`: the train command, held before step STEP until every process
# has joined jax's preemption protocol. Joining, a process writes the step it last reported to the
# coordination service (under PREEMPTION_CURRENT_COUNTER/, xla's preemption_sync_manager.cc), then
# keeps reached_preemption_sync_point waiting until the job's stop step, the next one, is settled.
# Unheld, a fast machine finishes the run before the notifier, which looks for SIGTERM once a
# second, passes it on.
HELD_RUN = """
import sys, time
import jax
from jax._src import distributed
from llama2_jax import cli
from llama2_jax.train import stopping

held_at = int(sys.argv.pop(1))
should_stop = stopping.StopRequests.should_stop


def held(self, step):
    if step == held_at:
        print(f"held before step {step}", flush=True)
        deadline = time.monotonic() + 120
        client = distributed.global_state.client
        while len(client.key_value_dir_get("PREEMPTION_CURRENT_COUNTER/")) < jax.process_count():
            if time.monotonic() > deadline:
                sys.exit(f"held before step {step} for 120 s: no process joined the preemption protocol")
            time.sleep(0.05)
    return should_stop(self, step)


stopping.StopRequests.should_stop = held
sys.exit(cli.main(sys.argv[1:]))
"""
HELD_AT = 3


def test_sigterm_to_one_process_stops_both_at_one_step_between_logs_and_the_run_resumes(
        tokenized_dir, one_process_run, tmp_path):
    workdir = tmp_path / "preempted"
    # Neither logs nor periodic checkpoints: the only checkpoint is the one the stop saves.
    flags = _tokenized_flags(tokenized_dir, STEPS, log_every=1000, checkpoint_every=1000)
    with reserved_port() as port:
        processes = _start_two_processes(["-c", HELD_RUN, str(HELD_AT), "train", *flags, f"--workdir={workdir}"],
                                         workdir, port)
        deadline = time.monotonic() + 240
        while f"held before step {HELD_AT}" not in _log(workdir, 1):
            assert time.monotonic() < deadline and processes[1].poll() is None, _log(workdir, 1)[-6000:]
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGTERM)  # a preemption notice to the second host only
        statuses = _finish(processes)
    assert statuses == [RESUMABLE_EXIT_STATUS] * 2, _log(workdir, 0)[-6000:] + _log(workdir, 1)[-3000:]
    stops = [re.findall(r"saves a checkpoint at step (\d+)", _log(workdir, index)) for index in range(2)]
    assert stops == [[str(HELD_AT)]] * 2, stops
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(HELD_AT)]
    # One process resumes what two saved, to the losses of the uninterrupted run.
    _train_one_process(_tokenized_flags(tokenized_dir, STEPS), workdir)
    _assert_close(_losses(workdir), _losses(one_process_run), range(HELD_AT + 1, STEPS + 1))
