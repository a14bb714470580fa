"""`load_pretrained`: a Meta, Hugging Face or orbax checkpoint in, a `Llama` on a mesh out.

Meta and HF weights stream in one parameter at a time: each of our stacked [L, ...] arrays is
assembled from the per-layer source tensors, placed shard by shard on the mesh, and released
before the next is read, so the host never holds the whole model twice. Our orbax checkpoints are
restored by orbax directly into their shards.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from llama2_jax import sharding
from llama2_jax.checkpoint import hf, layout, meta, orbax_params
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

FORMATS = ("meta", "hf", "orbax")
READERS = {"meta": meta.read_meta, "hf": hf.read_hf, "orbax": orbax_params.read_orbax_params}


def detect_format(path: str | os.PathLike) -> str:
    """`orbax` (model_config.json + state/ or a train workdir), `hf` (config.json) or `meta` (params.json)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if orbax_params.is_orbax_checkpoint(path):
        return "orbax"
    if hf.is_hf_checkpoint(path):
        return "hf"
    if meta.is_meta_checkpoint(path):
        return "meta"
    raise ValueError(
        f"{path} is not a known checkpoint format: expected Meta's params.json + consolidated.NN.pth, "
        "Hugging Face's config.json + *.safetensors, or ours (model_config.json + state/ or a train workdir)"
    )


def read_checkpoint(
    path: str | os.PathLike, format: str | None = None, **config_overrides: Any
) -> tuple[LlamaConfig, dict[str, LazyArray]]:
    """Config and every tensor in our per-layer layout, read lazily (orbax: restored to host memory)."""
    if format is not None and format not in READERS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    detected = detect_format(path)
    if format is not None and format != detected:
        raise ValueError(f"{path} is a {detected} checkpoint, not {format}")
    return READERS[detected](path, **config_overrides)


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    **config_overrides: Any,
) -> Llama:
    """A `Llama` with the checkpoint's weights, sharded over `mesh` (default: all local devices).

    `dtype` is the parameter dtype (default: the checkpoint's own, e.g. bfloat16 for Meta's
    files; pass float32 for training master weights); `config_overrides` set LlamaConfig fields
    that do not change shapes, e.g. `compute_dtype="float32"`, `attention="cudnn"`, `max_seq_len`
    (Meta's params.json does not record the context length, so it defaults to 4096).
    """
    path = os.fspath(path)
    format = detect_format(path)
    if dtype is not None:
        config_overrides["param_dtype"] = np.dtype(dtype).name
    if mesh is None:
        mesh = sharding.make_mesh(devices=jax.local_devices())
    if format == "orbax":
        return _restore_orbax(path, mesh, config_overrides)
    config, tensors = read_checkpoint(path, format, **config_overrides)
    if dtype is None:  # keep what the file stores: bfloat16 weights stay bfloat16
        config = config.replace(param_dtype=np.dtype(tensors["embedder.embedding"].dtype).name)
    stacked = layout.stack_layers(config, tensors, dtype=config.param_dtype)
    return sharding.model_from_arrays(
        config, mesh, {name: lazy.load for name, lazy in stacked.items()}
    )


def _restore_orbax(path: str, mesh: jax.sharding.Mesh, config_overrides: dict) -> Llama:
    config = orbax_params.read_config(path, **config_overrides)
    sharding.check_platform(config, mesh)
    graphdef, abstract_state = sharding.abstract_model(config)
    sharding.check_fits_mesh(abstract_state, mesh)
    flat_shardings = nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh))
    shardings = {".".join(map(str, key)): variable.get_value() for key, variable in flat_shardings}
    restored = orbax_params.restore_sharded(
        orbax_params.state_path(path), config, shardings, config.param_dtype
    )
    placed = [
        (key, variable.replace(restored[".".join(map(str, key))]))
        for key, variable in nnx.to_flat_state(abstract_state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(placed))
