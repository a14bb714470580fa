"""`python -m llama2_jax convert --from meta|hf|orbax --to meta|hf|orbax SRC DST`.

Conversion runs on the host without building a model: source tensors are read one at a time,
renamed, transposed and RoPE-permuted as the formats require, and written straight to the target
files. Only an orbax target needs the whole model in memory at once (orbax saves a whole tree);
even then the source is only ever read tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Mapping

import ml_dtypes
import numpy as np

from llama2_jax.checkpoint import hf, layout, meta, orbax_params
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.checkpoint.load import FORMATS, read_checkpoint
from llama2_jax.model.config import LlamaConfig
from llama2_jax.sharding import model_arrays

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '100000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


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


def export_model(
    model,
    path: str,
    format: str,
    *,
    meta_shards: int = 1,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a live `Llama`'s parameters as a `meta`, `hf` or `orbax` checkpoint, one layer at a time."""
    arrays = model_arrays(model)
    if format == "orbax":
        orbax_params.save_params(path, model.config, arrays)
        return
    tensors = layout.unstack_layers(model.config, arrays)
    write_checkpoint(
        path,
        format,
        model.config,
        tensors,
        meta_shards=meta_shards,
        max_shard_bytes=max_shard_bytes,
    )


def convert(
    source: str,
    source_format: str,
    target: str,
    target_format: str,
    *,
    dtype: str | None = None,
    meta_shards: int = 1,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> tuple[LlamaConfig, int]:
    """Convert a checkpoint; returns its config and the number of bytes written as tensors."""
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target} already exists and is not empty; choose a new directory")
    config, tensors = read_checkpoint(source, source_format)
    if dtype is not None:
        tensors = {key: tensor.astype(DTYPES[dtype]) for key, tensor in tensors.items()}
    write_checkpoint(
        target,
        target_format,
        config,
        tensors,
        meta_shards=meta_shards,
        max_shard_bytes=max_shard_bytes,
    )
    return config, sum(tensor.nbytes for tensor in tensors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax convert",
        description="Convert Llama 2 checkpoints between formats.",
    )
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="target_format", choices=FORMATS, required=True)
    parser.add_argument("source", metavar="SRC", help="checkpoint directory to read")
    parser.add_argument(
        "target", metavar="DST", help="new directory to write (must not hold files)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the source dtype)"
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="meta: number of model-parallel files to split into"
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=hf.DEFAULT_MAX_SHARD_BYTES,
        help="hf: largest safetensors file before sharding with an index (default 5GiB)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        config, written = convert(
            args.source,
            args.source_format,
            args.target,
            args.target_format,
            dtype=args.dtype,
            meta_shards=args.shards,
            max_shard_bytes=args.max_shard_size,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"convert: {error}", file=sys.stderr)
        return 1
    print(
        f"converted {args.source_format} {args.source} -> {args.target_format} {args.target}: "
        f"{config.n_layers} layers, dim {config.dim}, {written / 1e9:.2f} GB of weights "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
