"""The update step and the evaluation step: pure functions of (state, batch), jitted by the loop.

Gradient accumulation runs inside the step. A global batch of k·b rows is viewed as k micro-batches
of b rows, micro-batch j taking rows j, j+k, j+2k, …: with the batch sharded in contiguous blocks
over the data-parallel devices, every device then holds its share of every micro-batch and nothing
moves. `lax.scan` adds up the summed losses, metric sums and gradients of the micro-batches, and
the step divides by the total weight once, so k micro-batches equal one batch k times larger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama2_jax.model import axes
from llama2_jax.train.losses import Batch, LossFn
from llama2_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """`[k·b, …]` leaves → `[k, b, …]`, micro-batch j being rows j, j+k, j+2k, … (see module)."""

    def split(leaf: jax.Array) -> jax.Array:
        rows = leaf.shape[0] // micro_batches
        grouped = leaf.reshape(rows, micro_batches, *leaf.shape[1:]).swapaxes(0, 1)
        return axes.constrain(grouped, (None, axes.BATCH) + (None,) * (leaf.ndim - 1))

    return jax.tree.map(split, batch)


def _denominator(sums: Mapping[str, jax.Array]) -> jax.Array:
    # A batch of padding only has weight 0 and sums 0; report 0 rather than NaN.
    return jnp.where(sums["weight"] > 0, sums["weight"], 1.0)


def normalised_metrics(sums: Mapping[str, jax.Array]) -> Metrics:
    """Loss-function sums divided by their total weight; the weight itself is kept as a count."""
    denominator = _denominator(sums)
    metrics = {name: value / denominator for name, value in sums.items() if name != "weight"}
    metrics["weight"] = sums["weight"]
    return metrics


def _loss_and_grads(graphdef: nnx.GraphDef, loss_fn: LossFn):
    def objective(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)

    gradient = jax.value_and_grad(objective, has_aux=True)

    def loss_and_grads(params, batch):
        (loss_sum, sums), grads = gradient(params, batch)
        return grads, {"loss": loss_sum, **sums}

    return loss_and_grads


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One optimizer update from a global batch, accumulating over `grad_accum_steps`
    micro-batches. Metrics: loss and the loss function's other sums per unit of weight,
    `weight` (tokens), `grad_norm` (before clipping) and `learning_rate` of this update."""
    loss_and_grads = _loss_and_grads(graphdef, loss_fn)

    def accumulated(params, batch):
        if grad_accum_steps == 1:
            return loss_and_grads(params, batch)
        micro_batches = split_micro_batches(batch, grad_accum_steps)
        first = jax.tree.map(lambda leaf: leaf[0], micro_batches)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_and_grads, params, first)
        )

        def add_micro_batch(totals, micro_batch):
            return jax.tree.map(jnp.add, totals, loss_and_grads(params, micro_batch)), None

        totals, _ = jax.lax.scan(add_micro_batch, zeros, micro_batches)
        return totals

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grad_sums, sums = accumulated(state.params, batch)
        denominator = _denominator(sums)
        grads = jax.tree.map(lambda g: g / denominator, grad_sums)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = normalised_metrics(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn) -> Callable[[Any, Batch], Metrics]:
    """The loss function's sums (`loss` included) on one batch, for the loop to add up."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        loss_sum, sums = loss_fn(nnx.merge(graphdef, params), batch)
        return {"loss": loss_sum, **sums}

    return eval_step
