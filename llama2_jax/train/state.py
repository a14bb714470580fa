"""The train state: step, parameters and optimizer state as one pytree, laid out on the mesh.

Parameters are the model's trained `nnx.Param` state as a plain nested dict (`{"layers":
{"attention": {"wq": array}}}`), which is what orbax saves and what `nnx.merge(graphdef, params,
frozen)` accepts; the graphdef (the model's structure) is static and lives beside the state, never
inside it. A model with low-rank adapters trains those (and a reward model's score head) alone:
its other parameters are `frozen`, passed to the step beside the state, with no gradient, no
optimizer state and no place in the checkpoints (`split_params`); without adapters `frozen` is
empty. Optimizer moments take their parameter's sharding, so FSDP shards them too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax import sharding
from llama2_jax.train.optim import SubtreeOptimizers


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # nested dict of jax.Array, the model's nnx.Param values
    opt_state: optax.OptState


def trained_filter(config) -> nnx.filterlib.Filter:
    """What a run steps: every parameter, or with adapters (`config.lora_rank`) the adapters and a
    reward model's score head, which a base language model never had."""
    if not config.lora_rank:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("score"))


def split_model(model_or_state, config) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The graphdef, the trained and the frozen parameters of a model (or of its abstract state's
    model): a training model is its parameters, nothing else."""
    frozen = nnx.Param if config.lora_rank else nnx.Nothing
    return nnx.split(model_or_state, trained_filter(config), frozen)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """`split_model` with the parameters as nested dicts: (graphdef, trained, frozen)."""
    graphdef, trained, frozen = split_model(model, model.config)
    return graphdef, nnx.to_pure_dict(trained), nnx.to_pure_dict(frozen)


def _abstract_params(abstract_model_state: nnx.State) -> dict[str, Any]:
    return jax.tree.map(
        lambda variable: jax.ShapeDtypeStruct(variable.shape, variable.dtype),
        nnx.to_pure_dict(abstract_model_state),
    )


def train_state_shardings(
    abstract_model_state: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh, rules
) -> TrainState:
    """Where every leaf of the TrainState lives, from the parameters' logical axes."""
    params = nnx.to_pure_dict(sharding.state_shardings(abstract_model_state, mesh, rules))
    abstract_opt_state = jax.eval_shape(optimizer.init, _abstract_params(abstract_model_state))
    replicated = NamedSharding(mesh, PartitionSpec())

    def where(optimizer, abstract_opt_state, params):
        return optax.tree_map_params(
            optimizer,
            lambda _, param_sharding: param_sharding,
            abstract_opt_state,
            params,
            transform_non_params=lambda _: replicated,
        )

    if isinstance(optimizer, SubtreeOptimizers):
        opt_state = {name: where(group, abstract_opt_state[name], params[name])
                     for name, group in optimizer.groups.items()}
    else:
        opt_state = where(optimizer, abstract_opt_state, params)
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def abstract_train_state(
    abstract_model_state: nnx.State, optimizer: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """The TrainState as shapes with shardings: the restore target, nothing allocated."""
    params = _abstract_params(abstract_model_state)
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
    )
    return jax.tree.map(
        lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
        shapes,
        shardings,
    )


def init_train_state(
    params: dict[str, Any], optimizer: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """Step 0 with the given (already sharded) parameters and fresh optimizer state."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)
