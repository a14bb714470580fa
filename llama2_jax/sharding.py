"""The device mesh, the logical-axis rules table, and models created directly on the mesh.

The mesh has three axes: `data` (pure data parallelism, across slices over DCN when there are
several), `fsdp` (data parallelism with parameters and optimizer state sharded) and `tensor`
(heads, MLP and vocab split across devices). One rules table maps the model's logical axis names
(`llama2_jax.model.axes`) to these mesh axes; changing the parallelism is a config change.

Mesh axes are `Auto`: the partitioner inserts the FSDP all-gathers and reduce-scatters itself.
Explicit axes would make every matmul against an fsdp-sharded weight spell out its reshard, which
is exactly what FSDP leaves to the compiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax.model import axes
from llama2_jax.model.attention import check_available
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations: batch over every data-parallel axis, model dimension whole, heads/MLP/vocab split.
    (axes.BATCH, ("data", "fsdp")),
    (axes.LENGTH, None),
    # Sequence parallelism: between the blocks' matmuls the residual stream is split by length
    # over the tensor devices, which would otherwise each hold all of it (a no-op without tensor).
    (axes.RESIDUAL_LENGTH, "tensor"),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_KV_HEADS, "tensor"),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
    # Parameters: FSDP shards the model dimension, tensor parallelism the rest.
    (axes.VOCAB, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.Q_HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.MLP, "tensor"),
    (axes.LAYERS, None),
    (axes.NORM, None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per axis within a slice (ICI) and across slices (DCN); one -1 is filled in."""

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @classmethod
    def from_any(cls, values: Any) -> "MeshConfig":
        if isinstance(values, cls):
            return values
        fields = [field.name for field in dataclasses.fields(cls)]
        getter = values.get if isinstance(values, Mapping) else lambda k, d: getattr(values, k, d)
        return cls(**{name: int(getter(name, getattr(cls, name))) for name in fields})


def _fill(shape: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    shape = list(shape)
    unknown = [i for i, size in enumerate(shape) if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"{what} mesh {shape} has more than one -1; leave at most one axis to fill")
    known = math.prod(size for size in shape if size != -1)
    if unknown:
        if total % known:
            raise ValueError(
                f"{what} mesh {shape}: {total} devices are not divisible by {known}; "
                "change the fixed axis sizes"
            )
        shape[unknown[0]] = total // known
    if math.prod(shape) != total:
        raise ValueError(
            f"{what} mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"there are {total}; make the sizes multiply to {total} or set one of them to -1"
        )
    return tuple(shape)


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
    mesh_config = MeshConfig.from_any(mesh_config or MeshConfig())
    devices = list(jax.devices() if devices is None else devices)
    num_slices = 1 + max(getattr(device, "slice_index", 0) or 0 for device in devices)
    dcn = _fill(
        (mesh_config.dcn_data, mesh_config.dcn_fsdp, mesh_config.dcn_tensor), num_slices, "DCN"
    )
    ici = _fill(
        (mesh_config.ici_data, mesh_config.ici_fsdp, mesh_config.ici_tensor),
        len(devices) // num_slices,
        "ICI",
    )
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading batch axis over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, axes.logical_to_spec((axes.BATCH,), rules))


def batch_shard_count(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch axis is split: global batches must be a multiple of it."""
    mesh_axes = axes.logical_to_spec((axes.BATCH,), rules)[0] or ()
    return math.prod(mesh.shape[name] for name in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))


def generation_rules(rules=DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """Rules for sampling: parameters keep their tensor split but drop fsdp.

    Decoding reads every weight for every token; with fsdp-sharded weights each step would
    all-gather the whole model. Gathering once before sampling and freeing after is the paper's
    fix for sampling that was ~20× slower under FSDP.
    """

    def without_fsdp(mesh_axes):
        if mesh_axes is None:
            return None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        kept = tuple(name for name in names if name != "fsdp")
        return kept[0] if len(kept) == 1 else (kept or None)

    activation_names = {axes.BATCH, axes.LENGTH, axes.ACT_EMBED, axes.ACT_HEADS,
                        axes.ACT_KV_HEADS, axes.ACT_MLP, axes.ACT_VOCAB}
    # A decoding step is one token long: nothing to split by length, and no backward pass to keep it for.
    return tuple(
        (name, None if name == axes.RESIDUAL_LENGTH
         else mesh_axes if name in activation_names else without_fsdp(mesh_axes))
        for name, mesh_axes in rules
    )


# A variable with this metadata true (a quantized weight's scales: model/quantize.py) is split
# along an axis only where the devices divide it, and kept whole along it elsewhere: a small
# model's axis holds fewer blocks of scales than a mesh axis has devices.
WHOLE_WHERE_UNEVEN = "whole_where_uneven"


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """NamedShardings for a (possibly abstract) state, from each variable's logical axes."""

    def sharding_of(variable):
        names = variable.get_metadata().get("logical_axes") or (None,) * variable.ndim
        spec = axes.logical_to_spec(names, rules)
        if variable.get_metadata().get(WHOLE_WHERE_UNEVEN):
            spec = PartitionSpec(*(None if size % _devices(mesh, mesh_axes) else mesh_axes
                                   for size, mesh_axes in zip(variable.shape, spec)))
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _devices(mesh: Mesh, mesh_axes) -> int:
    """How many devices a dimension split over `mesh_axes` (None, a name or names) is split over."""
    if mesh_axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))


def check_fits_mesh(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    """Every sharded dimension must divide evenly by the devices it is split over."""
    problems = []
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata().get("logical_axes") or ()
        spec = axes.logical_to_spec(names, rules)
        for size, name, mesh_axes in zip(variable.shape, names, spec):
            if mesh_axes is None or variable.get_metadata().get(WHOLE_WHERE_UNEVEN):
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            devices = math.prod(mesh.shape[a] for a in mesh_axes)
            if size % devices:
                problems.append(
                    f"{_dotted(path)}: {name}={size} is not divisible by mesh axes "
                    f"{mesh_axes} of size {devices}"
                )
    if problems:
        raise ValueError(
            "the model does not fit the mesh " + str(dict(mesh.shape)) + ":\n  "
            + "\n  ".join(problems)
            + "\nchoose mesh sizes that divide these dimensions (e.g. a smaller ici_tensor), "
            "or map the logical axis elsewhere in config.rules"
        )


def check_platform(config: LlamaConfig, mesh: Mesh) -> None:
    check_available(config.attention, mesh.devices.flat[0].platform)


def abstract_model(config: LlamaConfig, model_class=Llama) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as shapes only."""
    return nnx.split(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))


def create_model(
    config: LlamaConfig, mesh: Mesh, rules=DEFAULT_RULES, seed: int = 0, model_class=Llama
):
    """A freshly initialised model whose parameters are born sharded (no full copy anywhere)."""
    check_platform(config, mesh)
    graphdef, abstract_state = abstract_model(config, model_class)
    check_fits_mesh(abstract_state, mesh, rules)
    shardings = state_shardings(abstract_state, mesh, rules)

    def initialise():
        return nnx.state(model_class(config, rngs=nnx.Rngs(seed)))

    state = jax.jit(initialise, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def model_from_arrays(
    config: LlamaConfig,
    mesh: Mesh,
    arrays: Mapping[str, np.ndarray | Callable[[], np.ndarray]],
    rules=DEFAULT_RULES,
    model_class=Llama,
):
    """A model whose parameters are `arrays` (dotted path → array, or a function returning it).

    Each array is placed shard by shard with `jax.make_array_from_callback`, so every process
    reads only the slices its devices hold, and is released before the next one is read.
    """
    check_platform(config, mesh)
    graphdef, abstract_state = abstract_model(config, model_class)
    check_fits_mesh(abstract_state, mesh, rules)
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    missing = sorted(set(map(_dotted, shardings)) - set(arrays))
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing}")
    placed = []
    for path, abstract in nnx.to_flat_state(abstract_state):
        name = _dotted(path)
        source = arrays[name]
        value = source() if callable(source) else source
        if tuple(value.shape) != tuple(abstract.shape):
            raise ValueError(
                f"tensor {name} has shape {tuple(value.shape)} in the checkpoint but the config "
                f"expects {tuple(abstract.shape)}; check that the checkpoint matches the config"
            )
        value = np.asarray(value).astype(abstract.dtype, copy=False)
        array = jax.make_array_from_callback(
            value.shape, shardings[path].get_value(), lambda index, value=value: value[index]
        )
        placed.append((path, abstract.replace(array)))
        del value, source
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def model_arrays(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters by dotted path, e.g. `layers.attention.wq`."""
    return {_dotted(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Mesh and rules in context for tracing: activation constraints and shard_map kernels use them."""
    with jax.set_mesh(mesh), spmd.logical_axis_rules(tuple(rules)):
        yield


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(part) for part in path)

