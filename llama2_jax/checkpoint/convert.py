"""Checkpoint conversion between Meta, Hugging Face and our orbax layout.

Conversion runs on the host without building a model: source tensors are read one at a time,
renamed, transposed and RoPE-permuted as the formats require, and written straight to the target
files. Only an orbax target needs the whole model in memory at once (orbax saves a whole tree);
even then the source is only ever read tensor by tensor.

Every target records what the format can hold of the source: the model kind (a reward model goes to
hf or orbax only), the compute dtype (hf and orbax; a Meta checkpoint computes in its storage
dtype) and the tokenizer, copied as `tokenizer.model` when the source has one. An hf target also
gets, with the tokenizer, what transformers reads to tokenize, chat and generate as we do:
`tokenizer_config.json` (with the Llama 2 chat template), `special_tokens_map.json` and, for a
language model, `generation_config.json` (hf_tokenizer.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping

import ml_dtypes
import numpy as np

from llama2_jax.checkpoint import hf, hf_tokenizer, layout, meta, orbax_params, peft
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.checkpoint.load import FORMATS, TOKENIZER_FILE, detect_format, read_checkpoint, tokenizer_file
from llama2_jax.model.config import LlamaConfig
from llama2_jax.sharding import model_arrays

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def write_checkpoint(
    path: str,
    format: str,
    config: LlamaConfig,
    tensors: Mapping[str, LazyArray],
    *,
    meta_shards: int = 1,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write per-layer tensors (our layout) as a `meta`, `hf` or `orbax` checkpoint."""
    if format == "meta":
        meta.write_meta(path, config, tensors, shards=meta_shards)
    elif format == "hf":
        hf.write_hf(path, config, tensors, max_shard_bytes=max_shard_bytes)
    elif format == "orbax":
        orbax_params.write_orbax_params(path, config, tensors)
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")


def copy_tokenizer(
    tokenizer_path: str, path: str, format: str, config: LlamaConfig, kind: str
) -> None:
    """Copy the tokenizer into checkpoint `path` as its `tokenizer.model`; an hf checkpoint also gets
    the files transformers reads with it (hf_tokenizer.py)."""
    shutil.copyfile(tokenizer_path, os.path.join(path, TOKENIZER_FILE))
    if format == "hf":
        hf_tokenizer.write_tokenizer_files(path, config, kind)


def export_model(
    model,
    path: str,
    format: str,
    tokenizer_path: str | None = None,
    *,
    meta_shards: int = 1,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a live model's parameters as a `meta`, `hf` or `orbax` checkpoint, one layer at a
    time, with `tokenizer_path` when given (`copy_tokenizer`)."""
    arrays = model_arrays(model)
    if format == "orbax":
        orbax_params.save_params(path, model.config, arrays)
    else:
        tensors = layout.unstack_layers(model.config, arrays)
        write_checkpoint(
            path,
            format,
            model.config,
            tensors,
            meta_shards=meta_shards,
            max_shard_bytes=max_shard_bytes,
        )
    if tokenizer_path:
        copy_tokenizer(tokenizer_path, path, format, model.config, layout.kind_of(arrays))


def convert(
    source: str,
    source_format: str,
    target: str,
    target_format: str,
    *,
    dtype: str | None = None,
    meta_shards: int = 1,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
    base: str = "",
) -> tuple[LlamaConfig, int]:
    """Convert a checkpoint; returns its config and the number of bytes written as tensors. A run
    that trained adapters converts as the merged model, or to `peft` as its adapters alone; a `peft`
    source is merged into `base` (any format) for the target."""
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target} already exists and is not empty; choose a new directory")
    if target_format == "peft":
        return export_adapters(source, source_format, target)
    if source_format == "peft":
        if not base:
            raise ValueError("a peft directory holds adapters alone: name the model they adapt with --base DIR")
        config, tensors = read_checkpoint(base)
        tensors = peft.merged_tensors(source, config, tensors)
    else:
        config, tensors = read_checkpoint(source, source_format)
    if dtype is not None:
        tensors = {key: tensor.astype(DTYPES[dtype]) for key, tensor in tensors.items()}
        config = config.replace(param_dtype=dtype)
    write_checkpoint(
        target,
        target_format,
        config,
        tensors,
        meta_shards=meta_shards,
        max_shard_bytes=max_shard_bytes,
    )
    weights = base if source_format == "peft" else source
    tokenizer = tokenizer_file(weights, detect_format(weights))
    if tokenizer:
        copy_tokenizer(tokenizer, target, target_format, config, layout.kind_of(tensors))
    return config, sum(tensor.nbytes for tensor in tensors.values())


def export_adapters(source: str, source_format: str, target: str) -> tuple[LlamaConfig, int]:
    """A run's trained adapters as a peft directory (checkpoint/peft.py); no base is read."""
    if source_format != "orbax" or not orbax_params.is_orbax_checkpoint(source):
        raise ValueError(f"--to peft writes the adapters of a run that trained them; {source} is not such a run "
                         "(--from orbax RUN)")
    config, kind = orbax_params.read_config(source)
    if not config.lora_rank:
        raise ValueError(f"{source} trained every weight, so it has no adapters to write; convert it to hf instead")
    if kind != "llama":
        raise ValueError(f"{source} is a {kind} model; peft export covers language models (convert it to hf merged)")
    adapters = orbax_params.restore_adapters(orbax_params.state_path(source))
    record = orbax_params.read_base_record(source) or {}
    peft.write_peft(target, config, adapters, base=record.get("path", ""))
    return config, sum(array.nbytes for array in adapters.values())
