"""`python -m llama2_jax aot`: the training step compiled ahead of time for a TPU topology.

Compiling needs libtpu, which the normal environment leaves out (with it installed, jax looks for
TPUs at start-up); run the first test in a virtualenv with `jax[tpu]` of the same version.
"""

import importlib.util
from pathlib import Path

import jax
import pytest

from llama2_jax import aot

TINY = f"--config={Path(__file__).parent.parent / 'configs' / 'pretrain.py'}:tiny"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tiny_train_step_compiles_for_v5p_and_reports_memory(capsys):
    code = aot.main([TINY, "--topology=v5p:2x2x1", "--config.optimizer.grad_accum_steps=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "4 chips" in printed and "'data': 4" in printed
    assert "2 micro-batch(es)" in printed
    for row in ("arguments", "outputs", "temporaries", "generated code", "total"):
        assert row in printed
    assert "fits in 95 GiB of HBM" in printed


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed, so there is no missing-libtpu error")
def test_without_libtpu_says_how_to_install_it(capsys):
    assert aot.main([TINY, "--topology=v5p:2x2x1"]) == 1
    error = capsys.readouterr().err
    assert "libtpu" in error
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in error
    assert "virtualenv" in error


def test_unknown_generation_is_named(capsys):
    assert aot.main([TINY, "--topology=v9x:2x2x1"]) == 1
    assert "unknown TPU generation" in capsys.readouterr().err
