"""The update step and the evaluation step of a Task, built and jitted in one place for the loop,
`aot` and `bench` alike (`build_steps`).

Gradient accumulation runs inside the step. A global batch of k·b rows is viewed as k micro-batches
of b rows, micro-batch j taking rows j, j+k, j+2k, …: with the batch sharded in contiguous blocks
over the data-parallel devices, every device then holds its share of every micro-batch and nothing
moves. `lax.scan` adds up the summed losses, metric sums and gradients of the micro-batches, and
the step divides by the total weight once, so k micro-batches equal one batch k times larger.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax import metrics, sharding
from llama2_jax.model import axes, lora
from llama2_jax.train import optim
from llama2_jax.train.losses import Batch, LossFn
from llama2_jax.train.state import TrainState, abstract_train_state, split_model, train_state_shardings
from llama2_jax.train.task import Task

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
    """Loss-function sums per unit of weight. A sum `x` with a companion `x_weight` is divided by
    that instead (e.g. accuracy over the pairs of one rating level); weights stay counts."""
    metrics = {}
    for name, value in sums.items():
        if name == "weight" or name.endswith("_weight"):
            metrics[name] = value
        else:
            own = sums.get(f"{name}_weight")
            metrics[name] = value / (_denominator(sums) if own is None else jnp.where(own > 0, own, 1.0))
    return metrics


def _loss_and_grads(graphdef: nnx.GraphDef, loss_fn: LossFn):
    def objective(params, frozen, batch, dropout_key):
        with lora.dropout_keys(dropout_key):
            return loss_fn(nnx.merge(graphdef, params, frozen), batch)

    gradient = jax.value_and_grad(objective, has_aux=True)

    def loss_and_grads(params, frozen, batch, dropout_key=None):
        (loss_sum, sums), grads = gradient(params, frozen, batch, dropout_key)
        return grads, {"loss": loss_sum, **sums}

    return loss_and_grads


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One optimizer update from a global batch, accumulating over `grad_accum_steps`
    micro-batches; `frozen`, the parameters the run does not train, goes into the model as they
    are. Metrics: loss and the loss function's other sums per unit of weight, `weight` (tokens),
    `grad_norm` (before clipping) and `learning_rate` of this update. With a `dropout_seed`, the
    adapters' dropout masks are drawn from it, the step number and the micro-batch's, so a resumed
    run draws what an uninterrupted one does."""
    loss_and_grads = _loss_and_grads(graphdef, loss_fn)

    def accumulated(params, frozen, batch, dropout_key):
        if grad_accum_steps == 1:
            return loss_and_grads(params, frozen, batch, dropout_key)
        micro_batches = split_micro_batches(batch, grad_accum_steps)
        first = jax.tree.map(lambda leaf: leaf[0], micro_batches)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_and_grads, params, frozen, first)
        )

        def add_micro_batch(totals, indexed):
            index, micro_batch = indexed
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return jax.tree.map(jnp.add, totals, loss_and_grads(params, frozen, micro_batch, key)), None

        totals, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(grad_accum_steps), micro_batches))
        return totals

    def train_step(state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, Metrics]:
        dropout_key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        grad_sums, sums = accumulated(state.params, frozen, batch, dropout_key)
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

    def eval_step(params: Any, batch: Batch, frozen: Any) -> Metrics:
        loss_sum, sums = loss_fn(nnx.merge(graphdef, params, frozen), batch)
        return {"loss": loss_sum, **sums}

    return eval_step


def check_batch_layout(global_batch_size: int, grad_accum_steps: int, mesh: Mesh, rules) -> None:
    batch_shards = sharding.batch_shard_count(mesh, rules)
    if global_batch_size % grad_accum_steps or (global_batch_size // grad_accum_steps) % batch_shards:
        raise ValueError(
            f"train.global_batch_size {global_batch_size} must split into optimizer.grad_accum_steps "
            f"{grad_accum_steps} micro-batches, each divisible by the {batch_shards} batch shards "
            f"of mesh {dict(mesh.shape)}; change the batch size, the accumulation steps or the mesh"
        )


@dataclasses.dataclass(frozen=True)
class Steps:
    """A task's jitted update and evaluation steps on a mesh, and the layouts they were built for.

    `train_step(state, batch, frozen) -> (state, metrics)` donates the state; `eval_step(params,
    batch, frozen)` returns the loss function's sums. `abstract_model` is the trained parameters,
    `abstract_frozen` the others (empty unless the model has adapters). Call them (or `lower`)
    inside `context()`, where the mesh and rules that activation constraints and shard_map kernels
    read are set.
    """

    task: Task
    mesh: Mesh
    rules: Any
    graphdef: nnx.GraphDef
    abstract_model: nnx.State
    abstract_frozen: nnx.State
    frozen_shardings: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    batch_sharding: NamedSharding
    global_batch_size: int
    train_step: Any
    eval_step: Any

    def context(self) -> contextlib.AbstractContextManager:
        return sharding.logical_context(self.mesh, self.rules)

    def abstract_state(self) -> TrainState:
        """The train state as shapes with shardings: a restore target, nothing allocated."""
        return abstract_train_state(self.abstract_model, self.optimizer, self.shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return self.task.batch_spec.abstract(self.global_batch_size, self.batch_sharding)

    def abstract_frozen_params(self) -> Any:
        """The frozen parameters as shapes with shardings."""
        def placed(variable, where):
            return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=where)

        return jax.tree.map(placed, nnx.to_pure_dict(self.abstract_frozen), self.frozen_shardings)

    def lower_train_step(self) -> jax.stages.Lowered:
        """The update step lowered for this task's state and batch shapes (what `aot` compiles)."""
        with self.context():
            return self.train_step.lower(self.abstract_state(), self.abstract_batch(), self.abstract_frozen_params())

    def model(self, params: Any, frozen: Any) -> nnx.Module:
        """The model of trained parameters `params` and `frozen` ones."""
        return nnx.merge(self.graphdef, params, frozen)

    @property
    def tokens_per_step(self) -> int:
        """Tokens the model runs through per optimizer step, padding included: a pair of
        responses counts as two sequences."""
        return self.global_batch_size * self.task.batch_spec.model_tokens_per_row()

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token of this task's model (metrics.py has the count)."""
        every_parameter = [*nnx.to_flat_state(self.abstract_model), *nnx.to_flat_state(self.abstract_frozen)]
        matmul_parameters = sum(
            variable.size for path, variable in every_parameter
            if axes.NORM not in (variable.get_metadata().get("logical_axes") or ())
            and path[-2:] != ("embedder", "embedding"))
        sequence_length = self.task.batch_spec.fields[self.task.batch_spec.model_inputs].shape[-1]
        return metrics.flops_per_token(self.task.model_config, sequence_length, matmul_parameters)


def build_steps(task: Task, config: ml_collections.ConfigDict, mesh: Mesh, rules, *,
                schedule_steps: int | None = None) -> Steps:
    """The update and evaluation steps of `task` under `config` (its `optimizer` section and
    `train.global_batch_size`) on `mesh` with `rules`. `schedule_steps` is the length of the
    learning-rate schedule when it is not `config.train.steps` (a resumed run keeps its own)."""
    grad_accum_steps = config.optimizer.grad_accum_steps
    check_batch_layout(config.train.global_batch_size, grad_accum_steps, mesh, rules)
    optimizer, schedule = optim.make_optimizer(config.optimizer, schedule_steps or config.train.steps, task.peak_lrs)
    abstract = nnx.eval_shape(lambda: task.model_class(task.model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_model, abstract_frozen = split_model(abstract, task.model_config)
    sharding.check_platform(task.model_config, mesh)
    for part in (abstract_model, abstract_frozen):
        sharding.check_fits_mesh(part, mesh, rules)
    shardings = train_state_shardings(abstract_model, optimizer, mesh, rules)
    frozen_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_frozen, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = jax.jit(
        make_train_step(graphdef, task.loss_fn, optimizer, schedule, grad_accum_steps,
                        dropout_seed=config.train.seed if task.model_config.lora_dropout else None),
        in_shardings=(shardings, batch_sharding, frozen_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, task.loss_fn),
        in_shardings=(shardings.params, batch_sharding, frozen_shardings),
        out_shardings=replicated,
    )
    return Steps(task, mesh, rules, graphdef, abstract_model, abstract_frozen, frozen_shardings, optimizer, schedule,
                 shardings, batch_sharding, config.train.global_batch_size, train_step, eval_step)
