"""Every command: `--help` exits 0, usage errors exit 2 and runtime errors exit 1, each with one
line on stderr that names the fix; every config key is documented."""

import glob
import os
import subprocess
import sys

import pytest

from llama2_jax import cli
from llama2_jax.config_cli import flat_keys, load_config_file
from llama2_jax.config_help import key_docs

CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "*.py")))
SUBCOMMANDS = {"data": ["build", "tokenize", "info"], "tokenizer": ["train", "encode", "decode"],
               "bench": ["train", "generate"]}


def all_help_invocations():
    for command in [*cli.STAGES, *cli.COMMANDS]:
        yield [command, "--help"]
        for sub in SUBCOMMANDS.get(command, []):
            yield [command, sub, "--help"]


@pytest.mark.parametrize("argv", list(all_help_invocations()), ids=" ".join)
def test_help_exits_0_for_every_command(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_help_with_a_config_lists_its_keys_values_and_meanings(capsys):
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", "--config.train.steps=7", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "steps = 7" in printed and "optimizer steps" in printed
    assert "remat = 'none'" in printed and "what the backward pass recomputes" in printed


def test_the_module_entry_point_prints_the_commands():
    done = subprocess.run([sys.executable, "-m", "llama2_jax", "--help"], capture_output=True, text=True, check=True)
    assert all(command in done.stdout for command in [*cli.STAGES, *cli.COMMANDS])


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config=configs/pretrain.py:tiny", "--workdir=/tmp/x", "--config.model.attention=flash"],
     "attention='flash'; choose one of"),
    (["train", "--config=configs/pretrain.py:tiny", "--config.train.step=3", "--workdir=/tmp/x"], "train.steps"),
    (["train", "--config=configs/pretrain.py:tiny"], "--workdir"),
    (["generate", "--checkpoint", "x"], "--prompts"),
    (["nonsense"], "unknown command"),
])
def test_usage_errors_exit_2_with_one_line(argv, expected, capsys):
    assert cli.main(argv) == 2
    assert expected in one_error_line(capsys)


def test_runtime_errors_exit_1_with_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompts", str(prompts),
                     "--out", str(tmp_path / "out.jsonl")]) == 1
    assert "does not exist" in one_error_line(capsys)
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'run'}",
                     "--config.data.dataset=never_built", f"--config.data.data_dir={tmp_path}"]) == 1
    assert "is not prepared" in one_error_line(capsys)


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=os.path.basename)
def test_every_config_key_is_documented(config_file):
    variants = {"sft.py": ("tiny,gatt",), "reward.py": ("tiny,safety", "70b,safety"), "grpo.py": ("tiny,instructions",),
                "pipeline.py": ("tiny,quick",)}
    for size in ("tiny", "7b", "70b", *variants.get(os.path.basename(config_file), ())):
        config = load_config_file(f"{config_file}:{size}")
        docs = key_docs(config)
        undocumented = [key for key in flat_keys(config) if not docs.get(key)]
        assert not undocumented, f"{config_file}:{size} keys without a meaning: {undocumented}"


def test_a_stage_stopped_with_its_checkpoint_saved_exits_75_for_the_launcher_to_requeue(monkeypatch, capsys, tmp_path):
    import types

    from llama2_jax.distributed import RESUMABLE_EXIT_STATUS
    from llama2_jax.stages import pretrain

    monkeypatch.setattr(pretrain, "run", lambda config, workdir: types.SimpleNamespace(interrupted=True))
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}"]) == RESUMABLE_EXIT_STATUS == 75
    assert "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(pretrain, "run", lambda config, workdir: types.SimpleNamespace(interrupted=False))
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}"]) == 0
