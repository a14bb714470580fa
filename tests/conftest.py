"""Eight simulated CPU devices, so every mesh shape in the tests is real; fixtures several test files
share."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny model pretrained for 30 steps, the initial checkpoint of the fine-tuning stages' tests
    (read, never written)."""
    from llama2_jax import cli

    workdir = tmp_path_factory.mktemp("pretrained")
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}", "--config.train.steps=30",
                     "--config.train.eval_every=0", "--config.train.sample_length=0", "--config.train.log_every=10",
                     "--config.train.seq_len=128"]) == 0
    return workdir
