"""Logical axis names: the only thing the model knows about how it is laid out on devices.

Parameters carry their names in a `logical_axes` metadata field; activations are constrained by
name at block boundaries. `llama2_jax.sharding` owns the rules table that maps names to mesh axes
and puts it in context (`nnx.logical_axis_rules`) together with the mesh (`jax.set_mesh`). Outside
such a context — a notebook on one device — constraints are no-ops and the model runs as is.
"""

from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

# Parameter axes.
VOCAB, EMBED, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, NORM = (
    "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm",
)
# Activation axes: kept apart from parameter axes so FSDP can shard weights on `embed`
# while activations keep the model dimension whole.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab",
)
# The length of the residual stream between the blocks' matmuls, apart from `length` so it can be
# split on its own (sequence parallelism): what each block keeps for the backward pass shrinks.
RESIDUAL_LENGTH = "residual_length"

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def logical_to_spec(names: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Maps logical names to mesh axes with the first rule whose mesh axes are still unused.

    A name may appear in several rules (e.g. `embed` → `fsdp`, then `embed` → None); the first
    one that does not reuse a mesh axis already taken by an earlier dimension wins, so one table
    serves every tensor.
    """
    used: set[str] = set()
    spec = []
    for name in names:
        chosen = None
        for rule_name, mesh_axes in rules:
            if rule_name != name:
                continue
            axes = () if mesh_axes is None else (
                (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            )
            if used.isdisjoint(axes):
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """Pins an activation's layout by logical names, when a mesh and rules are in context."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))
