"""Pretraining configs and the `--config=file.py:arg --config.a.b=v` loader."""

import pytest

from configs.pretrain import get_config
from llama2_jax.config_cli import ConfigError, parse_config_flags
from llama2_jax.model.config import LlamaConfig
from llama2_jax import cli


@pytest.mark.parametrize(
    "size, peak_lr, dim", [("7b", 3e-4, 4096), ("13b", 3e-4, 5120), ("34b", 1.5e-4, 8192), ("70b", 1.5e-4, 8192)]
)
def test_paper_sizes_carry_the_paper_recipe(size, peak_lr, dim):
    config = get_config(size)
    assert config.optimizer.peak_lr == peak_lr and config.optimizer.warmup_steps == 2000
    assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.95, 1e-5)
    assert config.optimizer.weight_decay == 0.1 and config.optimizer.clip_norm == 1.0
    assert config.optimizer.end_lr_fraction == 0.1
    assert config.train.global_batch_size * config.train.seq_len == 1024 * 4096
    assert config.train.steps * 1024 * 4096 == pytest.approx(2e12, rel=1e-3)
    assert LlamaConfig.from_dict(config.model.to_dict()).dim == dim


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_cpu_sizes_build_a_model_config(size):
    config = get_config(size)
    model = LlamaConfig.from_dict(config.model.to_dict())
    assert model.max_seq_len >= config.train.seq_len


def test_overrides_are_parsed_to_the_key_type():
    config, rest = parse_config_flags([
        "--config=configs/pretrain.py:tiny",
        "--config.optimizer.peak_lr=1e-3",
        "--config.train.steps", "7",
        "--config.model.remat=full",
        "--config.data.shuffle=false",
        "--config.optimizer.end_lr_fraction=0",
        "--workdir=/tmp/x",
    ])
    assert rest == ["--workdir=/tmp/x"]
    assert config.optimizer.peak_lr == 1e-3 and config.train.steps == 7
    assert config.model.remat == "full" and config.data.shuffle is False
    assert config.optimizer.end_lr_fraction == 0.0 and isinstance(config.optimizer.end_lr_fraction, float)


def test_misspelt_key_names_it_and_the_nearest_valid_keys():
    with pytest.raises(ConfigError, match=r"'optimizer\.peak_lrr'.*optimizer\.peak_lr"):
        parse_config_flags(["--config=configs/pretrain.py:tiny", "--config.optimizer.peak_lrr=1"])
    with pytest.raises(ConfigError, match=r"'trian\.steps'.*train\.steps"):
        parse_config_flags(["--config=configs/pretrain.py:tiny", "--config.trian.steps=1"])


def test_bad_values_and_files_are_clear_errors():
    with pytest.raises(ConfigError, match="train.steps.*'many'"):
        parse_config_flags(["--config=configs/pretrain.py:tiny", "--config.train.steps=many"])
    with pytest.raises(ConfigError, match="not found"):
        parse_config_flags(["--config=configs/nope.py:tiny"])
    with pytest.raises(ValueError, match="unknown size"):
        parse_config_flags(["--config=configs/pretrain.py:9b"])


def test_a_key_of_several_values_takes_one_bare_value_or_shows_the_tuple_syntax():
    for value in ("corpus/file.jsonl", "/abs/file.jsonl", "'file.jsonl'", "('file.jsonl',)"):
        config, _ = parse_config_flags(["--config=configs/pretrain.py:tiny", f"--config.data.paths={value}"])
        assert len(config.data.paths) == 1 and config.data.paths[0].endswith("file.jsonl")
    with pytest.raises(ConfigError, match=r"cannot parse 'hot' as tuple; .* --config.rejection.temperature=\"\(1.0,\)\""):
        parse_config_flags(["--config=configs/rejection.py:tiny", "--config.rejection.temperature=hot"])


def test_loaded_config_is_locked():
    config, _ = parse_config_flags(["--config=configs/pretrain.py:tiny"])
    with pytest.raises(AttributeError):
        config.train.stepz = 5


def test_train_command_reports_a_misspelt_key(capsys):
    code = cli.main(["train", "--config=configs/pretrain.py:tiny", "--config.train.step=3", "--workdir=/tmp/unused"])
    assert code == 2
    assert "train.steps" in capsys.readouterr().err
