"""`python -m llama2_jax aot` and `bench train` build a stage's step with the loop's own builder.

TPU topologies need libtpu, which the normal environment leaves out (with it installed, jax looks for
TPUs at start-up); those tests run in a virtualenv with `jax[tpu]` of the same version. The same
step compiles for this machine's CPU devices everywhere.
"""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from llama2_jax.commands import aot, bench
from llama2_jax.config_cli import parse_config_flags
from llama2_jax.stages import pretrain
from llama2_jax.train import loop

CONFIG = f"--config={Path(__file__).parent.parent / 'configs' / 'pretrain.py'}:tiny"
SMALL = [CONFIG, "--config.train.global_batch_size=16", "--config.train.seq_len=32",
         "--config.optimizer.grad_accum_steps=2", "--config.mesh.ici_fsdp=2", "--config.mesh.ici_data=-1"]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_aot_compiles_the_loops_own_step(monkeypatch, tmp_path):
    config, _ = parse_config_flags(SMALL)
    built = []

    class Built(Exception):
        pass

    def record(*args, **kwargs):
        built.append(loop_build_steps(*args, **kwargs))
        raise Built

    loop_build_steps = loop.build_steps
    monkeypatch.setattr(loop, "build_steps", record)
    with pytest.raises(Built):
        pretrain.run(config, str(tmp_path))
    (in_the_loop,) = built
    ahead_of_time = aot.stage_steps(config, jax.devices())
    assert in_the_loop.lower_train_step().as_text() == ahead_of_time.lower_train_step().as_text()


def test_aot_on_this_machines_devices_reports_memory(capsys):
    assert aot.main(SMALL + ["--topology=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain train step for cpu" in printed and "'fsdp': 2" in printed
    assert "batch 16 rows of 32 tokens in 2 micro-batch(es)" in printed
    for row in ("arguments", "outputs", "temporaries", "total"):
        assert row in printed


def test_bench_measures_the_same_step_and_counts_its_tokens(capsys):
    assert bench.main(["train", *SMALL, "--steps=2", "--warmup=0"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["rows"] == 16 and result["tokens_per_step"] == 16 * 32 and result["grad_accum"] == 2
    # Counted by hand for the tiny model (dim 128, 4 layers, 4 heads of 128 / 4, FFN 352 = 2/3 of 4 x 128
    # rounded up to a multiple of 32, vocabulary 4096) at 32 tokens: 6 FLOPs per matmul parameter (2
    # forward, 4 backward), with the output head but not the input embedding (a lookup), plus attention's
    # 6 x layers x seq_len x dim (scores and weighted values, forward and backward).
    attention_weights, mlp_weights, head = 4 * 128 * 128, 3 * 128 * 352, 128 * 4096
    matmul_parameters = 4 * (attention_weights + mlp_weights) + head
    assert matmul_parameters == 1_327_104
    assert result["flops_per_token"] == 6 * matmul_parameters + 6 * 4 * 32 * 128 == 8_060_928
    # tokens/s is tokens per step over the measured step time; TFLOP/s follows from the FLOP count.
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_s"], rel=1e-9)
    assert result["tflops_per_device"] == pytest.approx(
        result["tokens_per_s"] * result["flops_per_token"] / jax.device_count() / 1e12, rel=1e-9)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tiny_train_step_compiles_for_v5p_and_reports_memory(capsys):
    code = aot.main([CONFIG, "--topology=v5p:2x2x1", "--config.optimizer.grad_accum_steps=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "4 devices" in printed and "'data': 4" in printed
    assert "2 micro-batch(es)" in printed
    assert "fits in 95 GiB of HBM" in printed


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed, so there is no missing-libtpu error")
def test_without_libtpu_says_how_to_install_it(capsys):
    assert aot.main([CONFIG, "--topology=v5p:2x2x1"]) == 1
    error = capsys.readouterr().err
    assert "libtpu" in error
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in error
    assert "virtualenv" in error


def test_unknown_generation_is_named(capsys):
    assert aot.main([CONFIG, "--topology=v9x:2x2x1"]) == 1
    assert "unknown TPU generation" in capsys.readouterr().err


def test_bench_without_a_subcommand_shows_usage(capsys):
    assert bench.main([]) == 2
    assert "bench train|generate" in capsys.readouterr().err


def test_fit_hints_offer_micro_batches_only_while_a_chip_holds_more_than_one_example():
    config, _ = parse_config_flags(SMALL)  # 16 rows over 8 batch shards, in 2 micro-batches: 1 per shard
    steps = aot.stage_steps(config, jax.devices())
    hints = aot._fit_hints(config, steps)
    assert "grad_accum_steps" not in hints and "mesh.ici_tensor=4" in hints and "model.remat=full" in hints
    config.optimizer.grad_accum_steps = 1
    assert "grad_accum_steps" in aot._fit_hints(config, steps)
