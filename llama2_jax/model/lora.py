"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's projections, as a variable type of their own.

A target weight W (attention's q, k, v, o; the MLP's gate, up, down) gains A and B of rank r, and
its projection of x becomes x·W + (alpha / r)·(x·A)·B. A starts uniform in ±1/sqrt(fan-in) and B
at zero, as in peft, so a model with fresh adapters computes exactly what its base computes. A and
B are `nnx.LoRAParam`s: a run that trains adapters steps those (and a reward model's score head)
alone, and the base is frozen (train/state.py splits the two). A has W's input axes then the rank
axis, B the rank axis then W's output axes, so each is laid out as its weight by the same rules,
and the rank axis, which no rule names, stays whole on every device.

The adapters live in the model's own modules, on the einsums they adapt, rather than being added
by intercepting operations (qwix's way): the weights here are [dim, heads, head_dim] einsums inside
scanned, rematerialised blocks with a separate unstacked decoding copy, and explicit adapters keep
their logical axes, merge into W for decoding (`merged_arrays`), and map one to one onto peft's
`lora_A`/`lora_B` tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from llama2_jax.model import quantize

# Our name of each target, the base weight it adapts (module path inside a block, attribute), how
# many of that weight's leading axes are its input, and peft's name of the projection.
TARGETS = {
    "q": ("attention", "wq", 1, "self_attn.q_proj"),
    "k": ("attention", "wk", 1, "self_attn.k_proj"),
    "v": ("attention", "wv", 1, "self_attn.v_proj"),
    "o": ("attention", "wo", 2, "self_attn.o_proj"),
    "gate": ("feed_forward", "w1", 1, "mlp.gate_proj"),
    "up": ("feed_forward", "w3", 1, "mlp.up_proj"),
    "down": ("feed_forward", "w2", 1, "mlp.down_proj"),
}
LORA_RANK = "lora_rank"  # the rank axis: named by no rule, so never split
A_NAME, B_NAME = "lora_a", "lora_b"


def adapter_name(weight: str) -> str:
    """The attribute of a block's module holding the adapter of `weight` (`wq` -> `wq_lora`)."""
    return f"{weight}_lora"


# The key a training step draws adapter dropout from, while it runs (`dropout_keys`); None elsewhere,
# so sampling, scoring and evaluation never drop.
_dropout_key: list[jax.Array | None] = [None]


@contextlib.contextmanager
def dropout_keys(key: jax.Array | None):
    """Adapters called inside draw their dropout masks from `key` (each adapter its own, by
    `fold_in` of its weight's number; Transformer._run_layers gives each layer its own key)."""
    previous, _dropout_key[0] = _dropout_key[0], key
    try:
        yield
    finally:
        _dropout_key[0] = previous


def dropout_key() -> jax.Array | None:
    return _dropout_key[0]


class Adapter(nnx.Module):
    """A and B of one weight: `delta(x)` is (alpha / r)·(dropout(x)·A)·B, contracting x's last
    `inputs` axes; dropout (peft's `lora_dropout`) only inside `dropout_keys`."""

    def __init__(self, weight: nnx.Param, inputs: int, rank: int, alpha: float, dtype, compute_dtype,
                 *, rngs: nnx.Rngs, dropout: float = 0.0, number: int = 0):
        shape, names = weight.shape, weight.get_metadata()["logical_axes"]
        fan_in = math.prod(shape[:inputs])
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), (*shape[:inputs], rank), dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=(*names[:inputs], LORA_RANK))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, *shape[inputs:]), dtype),
                                    logical_axes=(LORA_RANK, *names[inputs:]))
        self.inputs = inputs
        self.scale = alpha / rank
        self.compute_dtype = compute_dtype
        self.dropout, self.number = dropout, number

    def __call__(self, x: jax.Array) -> jax.Array:
        key = dropout_key()
        if self.dropout and key is not None:
            kept = jax.random.bernoulli(jax.random.fold_in(key, self.number), 1 - self.dropout, x.shape)
            x = jnp.where(kept, x / (1 - self.dropout), 0).astype(x.dtype)
        a = self.lora_a[...].astype(self.compute_dtype)
        b = self.lora_b[...].astype(self.compute_dtype)
        down = jnp.tensordot(x, a, axes=self.inputs)
        return jnp.tensordot(down * jnp.asarray(self.scale, down.dtype), b, axes=1)


def add_adapters(module: nnx.Module, module_name: str, config, *, rngs: nnx.Rngs) -> None:
    """Gives `module` (a block's `attention` or `feed_forward`) an adapter for each of its weights
    that `config.lora_targets` names, when `config.lora_rank` > 0."""
    if config.lora_rank <= 0:
        return
    for target in config.lora_targets:
        owner, weight, inputs, _ = TARGETS[target]
        if owner == module_name:
            setattr(module, adapter_name(weight), Adapter(
                getattr(module, weight), inputs, config.lora_rank, config.lora_alpha, config.param_dtype,
                config.compute_dtype, rngs=rngs, dropout=config.lora_dropout, number=list(TARGETS).index(target)))


def adapted(module: nnx.Module, weight: str, x: jax.Array, projected: jax.Array) -> jax.Array:
    """`projected` (x through the base weight) plus the weight's adapter of x, if it has one."""
    adapter = getattr(module, adapter_name(weight), None)
    return projected if adapter is None else projected + adapter(x).astype(projected.dtype)


def merged_arrays(arrays: Mapping[str, jax.Array], config, dtype=None) -> dict[str, jax.Array]:
    """A model's arrays (`sharding.model_arrays`: dotted names, layers stacked) with every adapter
    merged into its weight, W + (alpha / r)·A·B, and gone: the arrays of a model without adapters
    that computes what the adapted one does, a quantized base's weights dequantized. The sum is
    float32; the merged weights are `dtype` (default: W's, or the compute dtype for a quantized W)."""
    merged = quantize.dequantized_arrays(arrays, dtype or config.base_dtype)
    suffix = f"_lora.{A_NAME}"
    for key in [key for key in arrays if key.endswith(suffix)]:
        weight_key = key[: -len(suffix)]
        a, b = merged.pop(key), merged.pop(f"{weight_key}_lora.{B_NAME}")
        weight = merged[weight_key]
        merged[weight_key] = merge_weight(weight, a, b, config.lora_alpha / config.lora_rank,
                                          jnp.dtype(dtype or weight.dtype))
    return merged


@functools.partial(jax.jit, static_argnums=(3, 4))
def merge_weight(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype) -> jax.Array:
    """W + scale·A·B for one weight, in `dtype`; the leading axis, if the three share it, is the layers'."""
    stacked = a.ndim + b.ndim - 2 > weight.ndim
    layers = (weight.shape[0],) if stacked else ()
    rank = a.shape[-1]
    a = a.reshape(*layers, -1, rank).astype(jnp.float32)
    b = b.reshape(*layers, rank, -1).astype(jnp.float32)
    product = jnp.einsum("...ir,...ro->...io", a, b).reshape(weight.shape)
    return (weight.astype(jnp.float32) + scale * product).astype(dtype)


def merged(model: nnx.Module, param_dtype: str | None = None) -> nnx.Module:
    """`model` with its adapters merged into its weights (`merged_arrays`): a model of the same class
    and shape without adapters, laid out as `model`'s are, its weights in `param_dtype` (default:
    the base's, enough to sample from; a checkpoint keeps the adapters' float32, where a bfloat16
    weight would round away much of a small update). A model without adapters is returned as it is."""
    config = model.config
    if not config.lora_rank:
        return model
    dotted = lambda path: ".".join(map(str, path))  # noqa: E731
    plain = config.without_adapters().replace(param_dtype=param_dtype or config.base_dtype)
    arrays = merged_arrays({dotted(path): variable[...] for path, variable in nnx.to_flat_state(nnx.state(model))},
                           config, plain.param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(plain, rngs=nnx.Rngs(0))))
    placed = [(path, variable.replace(arrays[dotted(path)].astype(variable.dtype)))
              for path, variable in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def without_adapters(model: nnx.Module) -> nnx.Module:
    """`model` computing exactly as its base: the same weights, every adapter's A and B zero (x·0·0
    adds nothing). What DPO, PPO and GRPO read their reference from when the policy trains
    adapters, so the base is held once. A model without adapters is returned as it is."""
    if not model.config.lora_rank:
        return model
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, adapters), rest)
