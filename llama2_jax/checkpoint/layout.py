"""Our parameter layout and the PyTorch (Meta / Hugging Face) one, tensor by tensor.

Our tree stacks layers on a leading axis and splits heads out (`wq` is [L, dim, heads, head_dim]);
PyTorch checkpoints keep one `nn.Linear` weight per layer as (out_features, in_features). Both Meta
and Hugging Face use that torch layout and differ only in names, in how q/k rows are ordered for
RoPE (Meta's adjacent pairs vs the rotate-half layout we share with HF) and in sharding. This module
owns the part they share: per-layer names, torch-layout shapes, the transposes between the two, and
stacking per-layer tensors into our [L, ...] arrays (and back) one tensor at a time.

The model kinds (llama2_jax.model.llama.MODEL_KINDS) share the backbone and differ only in the head
on top of it (`HEADS`). A set of tensors says its own kind by the head it holds (`kind_of`), so the
readers and writers pass tensors around without a separate kind to keep in step with them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from llama2_jax.checkpoint.lazy import LazyArray, as_lazy
from llama2_jax.model.config import LlamaConfig

BACKBONE_PARAMS = ("embedder.embedding", "norm.scale")
# The one parameter in which the model kinds differ: the language model's next-token head, or the
# reward model's scalar score.
HEADS = {"llama": "output.kernel", "reward": "score.kernel"}
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


def check_kind(kind: str) -> None:
    if kind not in HEADS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {sorted(HEADS)}")


def global_params(kind: str) -> tuple[str, ...]:
    """The parameters outside the layer stack of a model of this kind."""
    check_kind(kind)
    return (*BACKBONE_PARAMS, HEADS[kind])


def kind_of(tensors: Mapping[str, object]) -> str:
    """The model kind whose head is among `tensors` (ours, stacked or per layer)."""
    kinds = [kind for kind, head in HEADS.items() if head in tensors]
    if len(kinds) != 1:
        raise ValueError(
            f"a model needs exactly one head of {sorted(HEADS.values())}; these tensors hold "
            f"{[HEADS[kind] for kind in kinds] or 'none'}"
        )
    return kinds[0]


def per_layer_keys(config: LlamaConfig, kind: str) -> list[str]:
    """Every tensor of a checkpoint in our names, layers unstacked, in a natural file order."""
    embedding, norm, head = global_params(kind)
    keys = [embedding]
    for layer in range(config.n_layers):
        keys += [layer_key(layer, param) for param in LAYER_PARAMS]
    return keys + [norm, head]


def our_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's (or a global) parameter in our layout, by parameter name."""
    dim, heads, kv_heads, head_dim = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    return {
        "embedder.embedding": (config.vocab_size, dim),
        "norm.scale": (dim,),
        "output.kernel": (dim, config.vocab_size),
        "score.kernel": (dim, 1),
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
        "score.kernel": (1, dim),
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


def stacked_shapes(config: LlamaConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of our stacked tree (dotted names), for a model of this kind."""
    shapes = our_shapes(config)
    return {
        **{name: shapes[name] for name in global_params(kind)},
        **{f"layers.{name}": (config.n_layers, *shapes[name]) for name in LAYER_PARAMS},
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


TRANSPOSED = ("output.kernel", "score.kernel", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
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
    for name in global_params(kind_of(tensors)):
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
    for key in per_layer_keys(config, kind_of(arrays)):
        name = param_name(key)
        if not key.startswith("layers."):
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
