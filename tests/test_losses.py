"""Cross-entropy: known values, a float64 reference, and the vocabulary-parallel path on meshes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.sharding import DEFAULT_RULES, logical_context, make_mesh
from llama2_jax.train.losses import weighted_cross_entropy

VOCAB = 64


def _example(seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(8, 6, VOCAB))).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(8, 6)).astype(np.int32)
    weights = (rng.random((8, 6)) > 0.3).astype(np.float32)
    return logits, targets, weights


def _reference(logits, targets, weights, z_loss_weight=0.0):
    """float64 numpy: sum of weighted -log softmax(target) plus z-loss."""
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float((weights * (log_z - target_logit + z_loss_weight * log_z**2)).sum())


def test_uniform_model_loss_is_log_vocab():
    logits = jnp.zeros((2, 5, VOCAB))
    targets = jnp.arange(10).reshape(2, 5)
    loss_sum, sums = weighted_cross_entropy(logits, targets, jnp.ones((2, 5)))
    assert float(loss_sum / sums["weight"]) == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_matches_float64_reference_with_weights_and_z_loss():
    logits, targets, weights = _example()
    loss_sum, sums = weighted_cross_entropy(logits, targets, weights, z_loss_weight=1e-4)
    assert float(loss_sum) == pytest.approx(_reference(logits, targets, weights, 1e-4), rel=1e-6)
    assert float(sums["weight"]) == weights.sum()
    assert "z_loss" in sums and "cross_entropy" in sums


def test_zero_weight_tokens_do_not_count():
    logits, targets, weights = _example()
    changed = logits.copy()
    changed[weights == 0] = 100.0  # padding logits may be anything
    np.testing.assert_allclose(
        weighted_cross_entropy(changed, targets, weights)[0],
        weighted_cross_entropy(logits, targets, weights)[0],
        rtol=1e-6,
    )


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2), (1, 1, 8)])
def test_vocab_parallel_matches_reference(mesh_shape):
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(dict(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor, dcn_data=1))
    logits, targets, weights = _example(1)

    def loss(lg):
        return weighted_cross_entropy(lg, targets, weights, z_loss_weight=1e-4)[0]

    plain_grads = jax.grad(loss)(logits)
    with logical_context(mesh, DEFAULT_RULES):
        compiled = jax.jit(loss).lower(logits).compile()
        value = compiled(logits)
        grads = jax.jit(jax.grad(loss))(logits)
        jaxpr = str(jax.make_jaxpr(loss)(logits))
    assert float(value) == pytest.approx(_reference(logits, targets, weights, 1e-4), rel=1e-6)
    np.testing.assert_allclose(grads, plain_grads, atol=1e-6)
    # The logits stay split over the vocabulary: nothing gathers them.
    assert "shard_map" in jaxpr
    assert "all-gather" not in compiled.as_text()
