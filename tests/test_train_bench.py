"""`python -m llama2_jax bench train` runs the real step on the CPU shape and reports figures."""

import json

from llama2_jax import bench


def test_bench_train_tiny_prints_throughput(capsys):
    assert bench.main(["train", "--shape=tiny", "--steps=1", "--warmup=0", "--grad-accum=2"]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    result = json.loads(first_line)
    assert result["tokens_per_s"] > 0 and result["tflops_per_device"] > 0
    assert result["grad_accum"] == 2 and result["loss"] > 0


def test_bench_without_a_subcommand_shows_usage(capsys):
    assert bench.main([]) == 2
    assert "bench train|generate" in capsys.readouterr().err
