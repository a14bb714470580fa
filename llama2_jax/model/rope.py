"""Rotary position embeddings, in the "rotate half" layout.

Hugging Face checkpoints use this layout directly; Meta's checkpoints rotate adjacent pairs and the
converter permutes their q/k rows once at load time, so the model itself has a single code path.
Positions are explicit per token, so packed documents each restart at 0.
"""

import jax
import jax.numpy as jnp


def rotary_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies θ^(-2i/d) for i in [0, d/2)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates `x` [batch, length, heads, head_dim] by the angles of `positions` [batch, length].

    The angles are computed in float32: bfloat16 positions lose whole tokens beyond 256.
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rotary_frequencies(head_dim, theta)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
