"""A frozen base in 8 or 4 bits under low-rank adapters (QLoRA, Dettmers et al. 2023).

With `lora.base_dtype` int8 or int4, the seven projection weights of every block (attention's q,
k, v, o; the MLP's gate, up, down: nearly all of a Llama's parameters) are stored as integers with
one float32 scale per block of 64 consecutive input rows of each output (the whole input axis where
64 does not divide it): w ≈ q·scale, q = round(w / scale) in [-127, 127] or [-7, 7], scale the
block's largest |w| over 127 or 7, so a weight is off by at most half its block's scale. Each
projection dequantizes its weight to the compute dtype where it is used, inside the scanned,
rematerialised block, so no layer's float copy outlives its matmul. The embedding, the norms and
the output head stay in the compute dtype, as in QLoRA.

QLoRA itself uses 4-bit NormalFloat levels and quantizes the scales again; these are evenly spaced
integer levels with float32 scales (0.06 bits a weight more), which XLA dequantizes with one
multiply on every platform. The values keep their weight's logical axes and the scales name the
same axes (the blocked one counting blocks), so both are split over the mesh as the weight was;
a small model's scales are kept whole along an axis with fewer blocks than devices
(sharding.WHOLE_WHERE_UNEVEN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LEVELS = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}  # storage dtype, largest level
BLOCK = 64  # input rows that share a scale
SCALE_DTYPE = jnp.float32
# How many trailing axes of each projection are its outputs (wq: [dim, heads, head_dim]; wo: [heads,
# head_dim, dim]); the axis before them is the one blocked, and any before that is kept.
OUTPUT_AXES = {"wq": 2, "wk": 2, "wv": 2, "wo": 1, "w1": 1, "w3": 1, "w2": 1}


def scale_name(weight: str) -> str:
    """The attribute beside a quantized weight holding its scales (`wq` -> `wq_scale`)."""
    return f"{weight}_scale"


def stored_bits(dtype) -> int:
    """Bits a value of `dtype` takes on the accelerator (int4: 4, though a CPU array spends a byte)."""
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits


def _blocked_shape(shape: tuple[int, ...], outputs: int) -> tuple[int, ...]:
    """`shape` with its last input axis (the one before the `outputs` output axes) split into
    (blocks, rows a block)."""
    axis = len(shape) - outputs - 1
    rows = BLOCK if shape[axis] % BLOCK == 0 else shape[axis]
    return (*shape[:axis], shape[axis] // rows, rows, *shape[axis + 1:])


def quantize(weight: jax.Array, outputs: int, dtype: str) -> tuple[jax.Array, jax.Array]:
    """`weight`'s integer levels (its shape, in `dtype`) and their scales (its shape with the last
    input axis counting blocks). `outputs`: how many trailing axes are the weight's outputs."""
    storage, largest = LEVELS[dtype]
    blocked_shape = _blocked_shape(weight.shape, outputs)
    within = len(blocked_shape) - outputs - 1
    blocked = weight.astype(jnp.float32).reshape(blocked_shape)
    scale = jnp.max(jnp.abs(blocked), axis=within, keepdims=True) / largest
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: zeros at any scale
    levels = jnp.clip(jnp.round(blocked / scale), -largest, largest)
    return levels.astype(storage).reshape(weight.shape), jnp.squeeze(scale, within).astype(SCALE_DTYPE)


def dequantize(levels: jax.Array, scale: jax.Array, outputs: int, dtype) -> jax.Array:
    """levels·scale in `dtype`: the weight `quantize` was given, to within half a scale."""
    blocked_shape = _blocked_shape(levels.shape, outputs)
    within = len(blocked_shape) - outputs - 1
    blocked = levels.reshape(blocked_shape).astype(jnp.float32) * jnp.expand_dims(scale, within)
    return blocked.reshape(levels.shape).astype(dtype)


def quantize_weights(module: nnx.Module, weights: tuple[str, ...], dtype: str | None) -> None:
    """Replaces each of `module`'s `weights` (a block's projections) by its integer levels and adds
    its scales beside it, when `dtype` is int8 or int4 (a float `dtype`, or None, leaves them)."""
    if dtype not in LEVELS:
        return
    for name in weights:
        weight = getattr(module, name)
        names = weight.get_metadata()["logical_axes"]
        levels, scale = quantize(weight[...], OUTPUT_AXES[name], dtype)
        setattr(module, name, nnx.Param(levels, logical_axes=names))
        setattr(module, scale_name(name), nnx.Param(scale, logical_axes=names, whole_where_uneven=True))


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """`module`'s weight `name` in `dtype`, dequantized if it is stored quantized."""
    stored = getattr(module, name)[...]
    scale = getattr(module, scale_name(name), None)
    if scale is None:
        return stored.astype(dtype)
    return dequantize(stored, scale[...], OUTPUT_AXES[name], dtype)


def dequantized_arrays(arrays: dict[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """A model's arrays (dotted names, layers stacked) with every quantized weight dequantized to
    `dtype` and its scales gone."""
    plain = dict(arrays)
    suffix = "_scale"
    for key in [key for key in arrays if key.endswith(suffix) and key.rsplit(".", 1)[-1][:-len(suffix)] in OUTPUT_AXES]:
        weight_key = key[: -len(suffix)]
        levels, scale = plain[weight_key], plain.pop(key)
        plain[weight_key] = _dequantize_jit(levels, scale, OUTPUT_AXES[weight_key.rsplit(".", 1)[-1]],
                                            jnp.dtype(dtype))
    return plain


_dequantize_jit = jax.jit(dequantize, static_argnums=(2, 3))
