"""Losses for the one training loop.

A loss function has the signature `loss_fn(model, batch) -> (loss_sum, sums)`:

- `loss_sum` is the objective summed (not averaged) over the micro-batch, a float32 scalar;
- `sums["weight"]` is what the sum counts (tokens for language modelling, pairs for a reward
  model); every other entry of `sums` is also a sum over the micro-batch.

The train step adds these up over micro-batches and divides by the total weight only at the end, so
k micro-batches give exactly the gradient of one batch k times larger, however the weight (padding,
packing, prompt masking) is spread between them. Reported metrics are `sums[name] / weight`.

Cross-entropy is computed in float32. When the rules in context split the logits' vocabulary over
mesh axes, it is computed inside `jax.shard_map` on each device's slice of the logits, with a max
and two sums across those axes, so the full `[batch, length, vocab]` logits are never gathered.
"""

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from llama2_jax.model import axes

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def token_log_partition_and_target(
    logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token `logsumexp(logits)` and `logits[target]`, float32, shapes `[...]`."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z, target_logit


def _vocab_parallel_terms(vocab_axes, logits: jax.Array, targets: jax.Array):
    """The same as `token_log_partition_and_target`, on one device's vocabulary slice."""
    logits = logits.astype(jnp.float32)
    local_vocab = logits.shape[-1]
    first_id = jax.lax.axis_index(vocab_axes) * local_vocab
    # The max only keeps exp() in range; logsumexp does not depend on it, so no gradient flows.
    local_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    global_max = jax.lax.pmax(local_max, vocab_axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - global_max), axis=-1), vocab_axes)
    log_z = jnp.log(sum_exp) + global_max[..., 0]
    local_target = targets - first_id
    in_this_slice = (local_target >= 0) & (local_target < local_vocab)
    picked = jnp.take_along_axis(
        logits, jnp.clip(local_target, 0, local_vocab - 1)[..., None], axis=-1
    )[..., 0]
    target_logit = jax.lax.psum(jnp.where(in_this_slice, picked, 0.0), vocab_axes)
    return log_z, target_logit


def cross_entropy_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token `(log_z, target_logit)` for `[batch, length, vocab]` logits and `[batch, length]`
    targets. Vocabulary-parallel when the mesh and rules in context
    (`llama2_jax.sharding.logical_context`) split the logits' vocab axis over devices."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return token_log_partition_and_target(logits, targets)
    logits_spec = axes.logical_to_spec((axes.BATCH, axes.LENGTH, axes.ACT_VOCAB), rules)
    vocab_axes = logits_spec[2]
    if vocab_axes is None or math.prod(mesh.shape[a] for a in _as_tuple(vocab_axes)) == 1:
        return token_log_partition_and_target(logits, targets)
    token_spec = PartitionSpec(*logits_spec[:2])
    sharded = jax.shard_map(
        lambda lg, tg: _vocab_parallel_terms(vocab_axes, lg, tg),
        mesh=mesh,
        in_specs=(logits_spec, token_spec),
        out_specs=(token_spec, token_spec),
    )
    return sharded(logits, targets)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def weighted_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy summed with per-token `weights` (0 on padding, packing boundaries,
    masked prompts), plus `z_loss_weight * log_z²` (PaLM's z-loss, keeps the softmax normaliser
    near 1). Returns `(loss_sum, sums)` as described in the module docstring."""
    log_z, target_logit = cross_entropy_terms(logits, targets)
    weights = weights.astype(jnp.float32)
    cross_entropy_sum = jnp.sum(weights * (log_z - target_logit))
    sums = {"weight": jnp.sum(weights)}
    if not z_loss_weight:
        return cross_entropy_sum, sums
    z_loss_sum = jnp.sum(weights * jnp.square(log_z))
    sums.update(cross_entropy=cross_entropy_sum, z_loss=z_loss_sum)
    return cross_entropy_sum + z_loss_weight * z_loss_sum, sums


def make_next_token_loss(*, z_loss_weight: float = 0.0) -> LossFn:
    """The language-modelling loss over a packed batch: `inputs`, `targets`, `loss_weights`,
    `positions` and `segment_ids`, each `[batch, length]` (see llama2_jax/data)."""

    def next_token_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = model(
            batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        return weighted_cross_entropy(
            logits,
            batch["targets"],
            batch["loss_weights"],
            z_loss_weight=z_loss_weight,
        )

    return next_token_loss
