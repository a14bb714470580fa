"""Two JAX processes on this machine, four CPU devices each, training through one mesh."""

import json
import os
import pathlib
import subprocess
import sys

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
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
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
