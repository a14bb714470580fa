"""Meta's Llama 2 checkpoints: `params.json` plus `consolidated.NN.pth`, one file per model-parallel rank.

Each rank holds a slice of every matrix (docs/recipe.md): wq, wk, wv, w1, w3 and output are split on
dim 0 (their output features), wo, w2 and tok_embeddings on dim 1; norms are replicated. Meta's
RoPE rotates adjacent pairs of each head's q/k features, our model (like HF) rotates halves, so the
rows of wq and wk are permuted on the way in and back on the way out — the same permutation as HF's
`convert_llama_weights_to_hf.py`.

The format holds a language model only: there is no reward head, so a reward model goes to Hugging
Face or orbax instead. Nor can it record a compute dtype (Meta's reference code rejects unknown keys
in params.json), so a Meta checkpoint computes in the dtype its weights are stored in.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Mapping

import numpy as np

from llama2_jax.checkpoint import layout
from llama2_jax.checkpoint.lazy import LazyArray, as_lazy
from llama2_jax.checkpoint.torch_pickle import read_pth, write_pth
from llama2_jax.model.config import LlamaConfig

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth$")
GLOBAL_NAMES = {
    "embedder.embedding": "tok_embeddings.weight",
    "norm.scale": "norm.weight",
    "output.kernel": "output.weight",
}
# Tensor -> the axis model-parallel ranks split it on (None: replicated on every rank).
SPLIT_AXIS = {
    "embedder.embedding": 1,
    "output.kernel": 0,
    "norm.scale": None,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "feed_forward.w2": 1,
    "attention_norm.scale": None,
    "ffn_norm.scale": None,
}
# Meta's files carry the RoPE frequency table as a buffer; the model recomputes it.
IGNORED_NAMES = ("rope.freqs",)


def meta_name(key: str) -> str:
    """Our per-layer key (`layers.3.attention.wq`) -> Meta tensor name (`layers.3.attention.wq.weight`)."""
    if key in GLOBAL_NAMES:
        return GLOBAL_NAMES[key]
    return key.replace(".scale", "") + ".weight"


def is_meta_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def meta_to_rotate_half(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from adjacent pairs (x0, x1), (x2, x3)… to halves (x0, x2…, x1, x3…)."""
    rows, dim = weight.shape
    return (
        weight.reshape(heads, rows // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)
    )


def rotate_half_to_meta(weight: np.ndarray, heads: int) -> np.ndarray:
    rows, dim = weight.shape
    return (
        weight.reshape(heads, 2, rows // heads // 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)
    )


def _rope_heads(config: LlamaConfig, key: str) -> int | None:
    return {"attention.wq": config.n_heads, "attention.wk": config.n_kv_heads}.get(
        layout.param_name(key)
    )


def shard_files(path: str | os.PathLike) -> list[str]:
    """`consolidated.NN.pth` files in rank order; a gap in the numbering is a missing shard."""
    found = {
        int(SHARD_PATTERN.search(f).group(1)): f
        for f in glob.glob(os.path.join(path, "consolidated.*.pth"))
        if SHARD_PATTERN.search(f)
    }
    if not found:
        raise FileNotFoundError(f"{path} has {PARAMS_FILE} but no consolidated.NN.pth weight files")
    missing = [
        f"consolidated.{rank:02d}.pth" for rank in range(max(found) + 1) if rank not in found
    ]
    if missing:
        raise FileNotFoundError(f"{path}: model-parallel shard files are missing: {missing}")
    return [found[rank] for rank in sorted(found)]


def _merge(pieces: list[LazyArray], axis: int | None) -> LazyArray:
    if axis is None or len(pieces) == 1:
        return pieces[0]
    shape = list(pieces[0].shape)
    shape[axis] = sum(piece.shape[axis] for piece in pieces)
    return LazyArray(
        tuple(shape),
        pieces[0].dtype,
        lambda: np.concatenate([piece.load() for piece in pieces], axis=axis),
    )


def _check_shard_count(
    config: LlamaConfig, files: list[str], first_shard: Mapping[str, LazyArray]
) -> None:
    """If every split tensor of the first file is 1/M of its full size and M is not the number of
    files, files are missing (a wrong params.json would not shrink every tensor by the same factor)."""
    implied = set()
    for key in layout.per_layer_keys(config, "llama")[: 1 + len(layout.LAYER_PARAMS)]:
        axis = SPLIT_AXIS[layout.param_name(key)]
        if axis is None or meta_name(key) not in first_shard:
            continue
        full, piece = (
            layout.torch_shapes(config)[layout.param_name(key)][axis],
            first_shard[meta_name(key)].shape[axis],
        )
        implied.add(full // piece if piece and full % piece == 0 else None)
    if len(implied) == 1 and None not in implied and implied != {len(files)}:
        raise FileNotFoundError(
            f"found {len(files)} consolidated.NN.pth file(s), but {os.path.basename(files[0])} holds "
            f"1/{implied.pop()} of each weight: shard files are missing"
        )


def read_meta(
    path: str | os.PathLike, **config_overrides
) -> tuple[LlamaConfig, dict[str, LazyArray]]:
    """Config and every tensor in our per-layer layout, shards merged lazily."""
    path = os.fspath(path)
    with open(os.path.join(path, PARAMS_FILE)) as file:
        params = json.load(file)
    files = shard_files(path)
    shards = [read_pth(f) for f in files]
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{files[0]}: tensor tok_embeddings.weight is missing from the checkpoint")
    embedding = shards[0]["tok_embeddings.weight"]
    if params.get("vocab_size", -1) <= 0:  # Meta's own files say -1: the embedding knows
        params["vocab_size"] = embedding.shape[0]
    storage_dtype = np.dtype(embedding.dtype).name
    config = LlamaConfig.from_meta_params(
        params, **{"param_dtype": storage_dtype, "compute_dtype": storage_dtype, **config_overrides}
    )
    _check_shard_count(config, files, shards[0])
    tensors = {}
    for key in layout.per_layer_keys(config, "llama"):
        name = meta_name(key)
        for file_name, shard in zip(files, shards):
            if name not in shard:
                raise ValueError(f"{file_name}: tensor {name} is missing from the checkpoint")
        pieces = [shard.pop(name) for shard in shards]
        merged = _merge(pieces, SPLIT_AXIS[layout.param_name(key)])
        layout.check_shape(config, key, name, merged.shape)
        heads = _rope_heads(config, key)
        if heads is not None:
            merged = merged.then(lambda w, heads=heads: meta_to_rotate_half(w, heads))
        tensors[key] = layout.from_torch(config, key, merged)
    for file_name, shard in zip(files, shards):
        unknown = sorted(set(shard) - set(IGNORED_NAMES))
        if unknown:
            raise ValueError(
                f"{file_name}: tensors {unknown[:5]} do not belong to a {config.n_layers}-layer Llama"
            )
    return config, tensors


def _check_splittable(config: LlamaConfig, shards: int) -> None:
    sizes = {
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "dim": config.dim,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
    }
    uneven = [f"{name}={size}" for name, size in sizes.items() if size % shards]
    if shards < 1 or uneven:
        raise ValueError(
            f"cannot split the model into {shards} model-parallel shards: "
            f"{', '.join(uneven) or 'need at least one'} not divisible"
        )


def _shard_slice(weight: LazyArray, axis: int | None, rank: int, shards: int) -> LazyArray:
    if axis is None or shards == 1:
        return weight
    size = weight.shape[axis] // shards
    index = tuple(
        slice(rank * size, (rank + 1) * size) if a == axis else slice(None)
        for a in range(len(weight.shape))
    )
    shape = tuple(size if a == axis else n for a, n in enumerate(weight.shape))
    return weight.then(lambda w: w[index], shape=shape)


def write_meta(
    path: str | os.PathLike, config: LlamaConfig, tensors: Mapping[str, LazyArray], shards: int = 1
) -> None:
    """Write `params.json` and `shards` consolidated.NN.pth files that Meta's code loads."""
    path = os.fspath(path)
    kind = layout.kind_of(tensors)
    if kind != "llama":
        raise ValueError(
            f"Meta's format holds language models only and this is a {kind} model "
            f"({layout.HEADS[kind]}); export it as hf (LlamaForSequenceClassification) or orbax"
        )
    _check_splittable(config, shards)
    os.makedirs(path, exist_ok=True)
    params = config.to_meta_params()
    if params.get("rope_theta") == 10000.0:
        # Llama 2's reference ModelArgs has no rope_theta field and rejects unknown keys; only
        # checkpoints with another theta (Code Llama's layout) need it written.
        del params["rope_theta"]
    with open(os.path.join(path, PARAMS_FILE), "w") as file:
        json.dump(params, file, indent=2)
    full = {}
    for key in layout.per_layer_keys(config, kind):
        weight = layout.to_torch(config, key, as_lazy(tensors[key]))
        heads = _rope_heads(config, key)
        if heads is not None:
            weight = weight.then(lambda w, heads=heads: rotate_half_to_meta(w, heads))
        full[key] = weight
    for rank in range(shards):
        rank_tensors = {
            meta_name(key): _shard_slice(w, SPLIT_AXIS[layout.param_name(key)], rank, shards)
            for key, w in full.items()
        }
        write_pth(os.path.join(path, f"consolidated.{rank:02d}.pth"), rank_tensors)
