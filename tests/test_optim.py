"""The paper's optimizer: schedule values, weight-decay masking, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama2_jax.model.config import LlamaConfig
from llama2_jax.sharding import abstract_model
from llama2_jax.train.optim import (
    PAPER_OPTIMIZER,
    learning_rate_schedule,
    make_optimizer,
    weight_decay_mask,
)

PAPER = PAPER_OPTIMIZER


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (1000, 1.5e-4),  # halfway up the linear warmup
        (2000, 3e-4),  # peak
        (2000 + 49_000, 0.55 * 3e-4),  # halfway down the cosine: midway between peak and 10 %
        (100_000, 3e-5),  # end: 10 % of peak
        (150_000, 3e-5),  # stays there
    ],
)
def test_schedule_values_at_known_steps(step, expected):
    schedule = learning_rate_schedule(3e-4, 2000, 100_000, 0.1)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_schedule_cosine_shape():
    schedule = learning_rate_schedule(1.0, 10, 110, 0.1)
    for step in (20, 60, 95):
        progress = (step - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_decay_steps_overrides_run_length():
    _, fixed = make_optimizer({**PAPER, "decay_steps": 10_000}, total_steps=5_000)
    _, by_run = make_optimizer(PAPER, total_steps=10_000)
    for step in (0, 2500, 4999):
        assert float(fixed(step)) == float(by_run(step))


def test_weight_decay_mask_skips_only_norm_scales():
    config = LlamaConfig.from_preset("tiny")
    from flax import nnx

    params = nnx.to_pure_dict(abstract_model(config)[1])
    mask = {
        ".".join(str(k.key) for k in path): decays
        for path, decays in jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]
    }
    not_decayed = sorted(name for name, decays in mask.items() if not decays)
    assert not_decayed == ["layers.attention_norm.scale", "layers.ffn_norm.scale", "norm.scale"]
    assert mask["embedder.embedding"] and mask["output.kernel"] and mask["layers.attention.wq"]


def test_weight_decay_applies_to_matrices_and_not_to_norms():
    optimizer, schedule = make_optimizer({**PAPER, "warmup_steps": 0}, total_steps=100)
    params = {"norm": {"scale": jnp.full((4,), 2.0)}, "proj": {"kernel": jnp.full((4, 4), 2.0)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    lr = float(schedule(0))
    np.testing.assert_allclose(updates["proj"]["kernel"], -lr * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def _two_updates(optimizer, params, first, second):
    state = optimizer.init(params)
    _, state = optimizer.update(first, state, params)
    updates, _ = optimizer.update(second, state, params)
    return updates


def test_clipping_bounds_the_global_norm():
    params = {"w": jnp.ones((3, 4))}
    grads = {"w": jnp.full((3, 4), 1.0 / math.sqrt(12))}  # global norm exactly 1
    large = jax.tree.map(lambda g: 10 * g, grads)
    clipped, _ = make_optimizer(PAPER, total_steps=10_000)
    # Adam is scale-free on its first step, so the second step shows what clipping did.
    np.testing.assert_allclose(
        _two_updates(clipped, params, grads, large)["w"],
        _two_updates(clipped, params, grads, grads)["w"],
        rtol=1e-6,
    )
    unclipped, _ = make_optimizer({**PAPER, "clip_norm": 1e9}, total_steps=10_000)
    assert not np.allclose(
        _two_updates(unclipped, params, grads, large)["w"],
        _two_updates(unclipped, params, grads, grads)["w"],
        rtol=1e-3,
    )


def test_adamw_hyperparameters_are_the_papers():
    optimizer, _ = make_optimizer(PAPER, total_steps=10_000)
    params = {"w": jnp.zeros((2, 2))}
    state = optimizer.init(params)
    grads = {"w": jnp.array([[0.1, -0.2], [0.3, 0.0]])}
    _, state = optimizer.update(grads, state, params)
    adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                  if isinstance(s, optax.ScaleByAdamState)][0]
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * grads["w"], rtol=1e-6)
    np.testing.assert_allclose(adam_state.nu["w"], 0.05 * grads["w"] ** 2, rtol=1e-6)


def test_warmup_is_the_larger_of_its_steps_and_its_share_of_the_schedule():
    # The reward models' recipe: warmup 3 % of the steps, at least 5.
    recipe = {**PAPER, "peak_lr": 1e-5, "warmup_steps": 5, "warmup_fraction": 0.03}
    _, short = make_optimizer(recipe, total_steps=100)  # 3 steps < 5
    _, long = make_optimizer(recipe, total_steps=1000)  # 30 steps
    assert float(short(5)) == pytest.approx(1e-5) and float(short(4)) == pytest.approx(0.8e-5)
    assert float(long(30)) == pytest.approx(1e-5) and float(long(15)) == pytest.approx(0.5e-5)
