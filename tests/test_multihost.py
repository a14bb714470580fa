"""Two JAX processes on this machine, four CPU devices each, training through one mesh."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_two_processes_train_checkpoint_and_agree(tmp_path):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    command = [
        "bash", str(REPO / "launch/local_multihost.sh"), "2", "4", "--",
        sys.executable, "-m", "llama2_jax", "train", "--config=configs/pretrain.py:tiny",
        f"--workdir={workdir}", "--config.train.steps=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
        "--config.train.sample_length=0",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 4
    assert (workdir / "checkpoints" / "4").is_dir()
    output = done.stdout + done.stderr
    assert "[process 0]" in output and "[process 1]" in output  # both joined, both exited 0
