"""`python -m llama2_jax train` end to end on the bundled corpus: learns, saves, resumes exactly."""

import json
import os

import pytest

from llama2_jax.metrics import read_metrics
from llama2_jax.train import pretrain

SMALL_RUN = [
    "--config=configs/pretrain.py:tiny",
    "--config.train.global_batch_size=8",
    "--config.train.seq_len=64",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=4",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.decay_steps=8",
    "--config.train.sample_length=0",
]


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eight"))
    assert pretrain.main(SMALL_RUN + ["--config.train.steps=8", f"--workdir={workdir}"]) == 0
    return workdir


def test_trains_on_the_bundled_corpus(eight_steps, capsys):
    losses = train_losses(eight_steps)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.5
    assert sorted(os.listdir(os.path.join(eight_steps, "checkpoints"))) == ["4", "8"]
    with open(os.path.join(eight_steps, "model_config.json")) as model_config:
        assert json.load(model_config)["vocab_size"] == 4096
    assert os.path.getsize(os.path.join(eight_steps, "tokenizer.model")) > 0


def test_four_steps_then_four_more_equal_eight_data_position_included(eight_steps, tmp_path):
    workdir = str(tmp_path)
    assert pretrain.main(SMALL_RUN + ["--config.train.steps=4", f"--workdir={workdir}"]) == 0
    assert pretrain.main(SMALL_RUN + ["--config.train.steps=8", f"--workdir={workdir}"]) == 0
    assert train_losses(workdir) == train_losses(eight_steps)


def test_prints_a_sample_at_the_end(eight_steps, capsys):
    # The run is complete, so this only restores it and samples.
    args = SMALL_RUN + ["--config.train.steps=8", "--config.train.sample_length=8", f"--workdir={eight_steps}"]
    assert pretrain.main(args) == 0
    output = capsys.readouterr().out
    assert "unigram entropy" in output and "ROMEO:" in output
