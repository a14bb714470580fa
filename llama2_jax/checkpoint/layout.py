"""Our parameter layout and the PyTorch (Meta / Hugging Face) one, tensor by tensor.

Our tree stacks layers on a leading axis and splits heads out (`wq` is [L, dim, heads, head_dim]);
PyTorch checkpoints keep one `nn.Linear` weight per layer as (out_features, in_features). Both Meta
and Hugging Face use that torch layout and differ only in names, in how q/k rows are ordered for
RoPE (Meta's adjacent pairs vs the rotate-half layout we share with HF) and in sharding. This module
owns the part they share: per-layer names, torch-layout shapes, the transposes between the two, and
stacking per-layer tensors into our [L, ...] arrays (and back) one tensor at a time.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from llama2_jax.checkpoint.lazy import LazyArray, as_lazy
from llama2_jax.model.config import LlamaConfig

GLOBAL_PARAMS = ("embedder.embedding", "norm.scale", "output.kernel")
LAYER_PARAMS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
    "attention_norm.scale",
    "ffn_norm.scale",
)


def layer_key(layer: int, param: str) -> str:
    return f"layers.{layer}.{param}"


def per_layer_keys(config: LlamaConfig) -> list[str]:
    """Every tensor of a checkpoint in our names, layers unstacked, in a natural file order."""
    keys = ["embedder.embedding"]
    for layer in range(config.n_layers):
        keys += [layer_key(layer, param) for param in LAYER_PARAMS]
    return keys + ["norm.scale", "output.kernel"]


def our_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's (or a global) parameter in our layout, by parameter name."""
    dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    return {
        "embedder.embedding": (config.vocab_size, dim),
        "norm.scale": (dim,),
        "output.kernel": (dim, config.vocab_size),
        "attention.wq": (dim, heads, head_dim),
        "attention.wk": (dim, kv_heads, head_dim),
        "attention.wv": (dim, kv_heads, head_dim),
        "attention.wo": (heads, head_dim, dim),
        "feed_forward.w1": (dim, config.ffn_dim),
        "feed_forward.w3": (dim, config.ffn_dim),
        "feed_forward.w2": (config.ffn_dim, dim),
        "attention_norm.scale": (dim,),
        "ffn_norm.scale": (dim,),
    }


def torch_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of the same parameter as a torch weight: Linear is (out_features, in_features)."""
    dim, ffn_dim = config.dim, config.ffn_dim
    return {
        "embedder.embedding": (config.vocab_size, dim),
        "norm.scale": (dim,),
        "output.kernel": (config.vocab_size, dim),
        "attention.wq": (config.n_heads * config.head_dim, dim),
        "attention.wk": (config.n_kv_heads * config.head_dim, dim),
        "attention.wv": (config.n_kv_heads * config.head_dim, dim),
        "attention.wo": (dim, config.n_heads * config.head_dim),
        "feed_forward.w1": (ffn_dim, dim),
        "feed_forward.w3": (ffn_dim, dim),
        "feed_forward.w2": (dim, ffn_dim),
        "attention_norm.scale": (dim,),
        "ffn_norm.scale": (dim,),
    }


def param_name(key: str) -> str:
    """`layers.3.attention.wq` -> `attention.wq`; global names pass through."""
    if key.startswith("layers."):
        return key.split(".", 2)[2]
    return key


def check_shape(config: LlamaConfig, key: str, source_name: str, shape: tuple[int, ...]) -> None:
    expected = torch_shapes(config)[param_name(key)]
    if tuple(shape) != expected:
        raise ValueError(
            f"checkpoint tensor {source_name} has shape {tuple(shape)} but the config "
            f"(dim={config.dim}, n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
            f"ffn_dim={config.ffn_dim}, vocab_size={config.vocab_size}) needs {expected}"
        )


TRANSPOSED = ("output.kernel", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv")


def from_torch(config: LlamaConfig, key: str, weight: LazyArray) -> LazyArray:
    """A torch-layout weight (q/k rows in rotate-half order) in our layout."""
    name = param_name(key)
    if name in PROJECTIONS or name == "attention.wo":
        return weight.transpose().reshape(*our_shapes(config)[name])
    if name in TRANSPOSED:
        return weight.transpose()
    return weight


def to_torch(config: LlamaConfig, key: str, array: LazyArray) -> LazyArray:
    """Inverse of `from_torch`: our layout back to (out_features, in_features)."""
    name = param_name(key)
    if name in PROJECTIONS:
        dim, heads, head_dim = array.shape
        return array.reshape(dim, heads * head_dim).transpose()
    if name == "attention.wo":
        heads, head_dim, dim = array.shape
        return array.reshape(heads * head_dim, dim).transpose()
    if name in TRANSPOSED:
        return array.transpose()
    return array


def stack_layers(
    config: LlamaConfig, tensors: Mapping[str, LazyArray], dtype=None
) -> dict[str, LazyArray]:
    """Per-layer tensors (our layout) -> our stacked tree, each stacked array built only on `load()`.

    Loading a stacked parameter preallocates its [L, ...] array and copies one layer's source tensor
    in at a time, so the peak is that one array plus one source tensor.
    """
    shapes = our_shapes(config)
    stacked = {}
    for name in GLOBAL_PARAMS:
        source = tensors[name]
        stacked[name] = source if dtype is None else source.astype(dtype)
    for name in LAYER_PARAMS:
        layer_tensors = [tensors[layer_key(layer, name)] for layer in range(config.n_layers)]
        array_dtype = np.dtype(dtype or layer_tensors[0].dtype)
        stacked[f"layers.{name}"] = LazyArray(
            (config.n_layers, *shapes[name]), array_dtype, _stacker(layer_tensors, array_dtype)
        )
    return stacked


def _stacker(layer_tensors: list[LazyArray], dtype: np.dtype):
    def produce() -> np.ndarray:
        out = np.empty((len(layer_tensors), *layer_tensors[0].shape), dtype)
        for layer, tensor in enumerate(layer_tensors):
            out[layer] = tensor.load()
        return out

    return produce


def unstack_layers(config: LlamaConfig, arrays: Mapping[str, object]) -> dict[str, LazyArray]:
    """Our stacked tree (numpy or jax arrays) -> per-layer lazy slices, in checkpoint file order."""
    tensors = {}
    for key in per_layer_keys(config):
        name = param_name(key)
        if name in GLOBAL_PARAMS:
            tensors[key] = as_lazy(arrays[name])
        else:
            stacked = arrays[f"layers.{name}"]
            layer = int(key.split(".")[1])
            tensors[key] = LazyArray(
                tuple(stacked.shape[1:]),
                np.dtype(stacked.dtype),
                lambda stacked=stacked, layer=layer: np.asarray(stacked[layer]),
            )
    return tensors
