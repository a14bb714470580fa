"""`python -m llama2_jax train` end to end on the bundled corpus: learns, saves, resumes exactly."""

import json
import os

import pytest

from llama2_jax import cli, generate, sharding
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.config_cli import parse_config_flags
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.metrics import read_metrics

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
    assert cli.main(["train"] + SMALL_RUN + ["--config.train.steps=8", f"--workdir={workdir}"]) == 0
    return workdir


def test_trains_on_the_bundled_corpus(eight_steps, capsys):
    losses = train_losses(eight_steps)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.5
    assert sorted(os.listdir(os.path.join(eight_steps, "checkpoints"))) == ["4", "8"]
    with open(os.path.join(eight_steps, "model_config.json")) as model_config:
        assert json.load(model_config)["vocab_size"] == 4096
    assert os.path.getsize(os.path.join(eight_steps, "tokenizer.model")) > 0
    # The stage runner draws the run's figures when it ends (tests/test_plots.py checks their pixels).
    assert sorted(name for name in os.listdir(eight_steps) if name.endswith(".png")) == [
        "learning_rate.png", "loss.png", "throughput.png"]


def test_four_steps_then_four_more_equal_eight_data_position_included(eight_steps, tmp_path):
    workdir = str(tmp_path)
    assert cli.main(["train"] + SMALL_RUN + ["--config.train.steps=4", f"--workdir={workdir}"]) == 0
    assert cli.main(["train"] + SMALL_RUN + ["--config.train.steps=8", f"--workdir={workdir}"]) == 0
    assert train_losses(workdir) == train_losses(eight_steps)


def test_prints_a_sample_of_the_trained_model(eight_steps, capsys):
    # The run is complete, so this only restores it and samples.
    args = SMALL_RUN + ["--config.train.steps=8", "--config.train.sample_length=12", f"--workdir={eight_steps}"]
    assert cli.main(["train"] + args) == 0
    printed = capsys.readouterr().out.split("--- sample ---\n")[1].split("\n--------------")[0]
    # The same continuation, sampled again from the saved model on the run's mesh with the same seed.
    config, _ = parse_config_flags(args)
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = Tokenizer(os.path.join(eight_steps, "tokenizer.model"))
    prompt = tokenizer.encode("ROMEO:", bos=True)
    again = generate.generate(load_pretrained(eight_steps, mesh=mesh), [prompt], max_new_tokens=12,
                              eos_id=tokenizer.eos_id, sampling=generate.SamplingParams(temperature=0.8, top_p=0.9),
                              mesh=mesh)
    assert printed == tokenizer.decode(prompt + again.token_lists()[0])
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:") + 8


def test_a_chat_dataset_given_to_train_names_the_sft_command(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    code = cli.main(["train"] + SMALL_RUN + [
        "--config.train.steps=1", f"--config.data.paths=('{chats}',)", "--config.data.format=chat",
        "--config.data.dataset=chats", f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}"])
    output = capsys.readouterr()
    assert code == 1 and output.err.count("\n") == 1
    assert "data.format=chat" in output.err and "python -m llama2_jax sft" in output.err
    # Refused before the files are built into a dataset.
    assert not (tmp_path / "tfds").exists() and "building dataset" not in output.out
