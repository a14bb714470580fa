"""Peak resident memory of converting a ~1B-parameter checkpoint, to show conversion streams.

Writes a random Hugging Face checkpoint of the 1.1B shape (dim 2048, 22 layers, 32 heads / 4 kv
heads, FFN 5632, vocab 32000) to a scratch directory, then runs each conversion as its own process
(`python -m llama2_jax convert ...`) and reads that process's peak RSS from the kernel (wait4).
A converter that held the model twice would peak above twice the weights; streaming peaks near
the interpreter's own footprint plus the largest tensor (the embedding). An orbax target holds the
whole model once, because orbax saves a whole tree.

    python benchmarks/convert_memory.py [--dir /tmp/llama2_convert_bench] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing the package

from llama2_jax.checkpoint import hf, layout
from llama2_jax.checkpoint.convert import DTYPES
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.model.config import LlamaConfig

SHAPE_1B = dict(
    vocab_size=32000,
    dim=2048,
    n_layers=22,
    n_heads=32,
    n_kv_heads=4,
    multiple_of=256,
    ffn_dim_multiplier=None,
    max_seq_len=2048,
)


def write_random_hf(path: str, dtype) -> LlamaConfig:
    """A random checkpoint written tensor by tensor, so making it is as light as converting it."""
    config = LlamaConfig(**SHAPE_1B).replace(ffn_dim_multiplier=5632 / 5461)
    assert config.ffn_dim == 5632, config.ffn_dim
    shapes = layout.our_shapes(config)
    rng = np.random.default_rng(0)

    def random_tensor(shape):
        return LazyArray(
            shape,
            np.dtype(dtype),
            lambda: (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype),
        )

    tensors = {
        key: random_tensor(shapes[layout.param_name(key)]) for key in layout.per_layer_keys(config)
    }
    hf.write_hf(path, config, tensors)
    return config


# The child reports its own high-water mark: VmHWM belongs to the exec'd image, whereas
# getrusage's ru_maxrss would also count this (larger) parent process it was forked from.
CHILD = """
import re, sys
from llama2_jax.__main__ import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_request:  # argparse's --help
    code = exit_request.code or 0
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(f"peak_rss_bytes={peak_kib * 1024}")
sys.exit(code)
"""


def peak_rss_of(args: list[str]) -> tuple[float, float]:
    """Run `python -m llama2_jax <args>` in a fresh process; return (its peak RSS in GB, wall seconds)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"convert {' '.join(args)} failed:\n{result.stderr}")
    peak = int(re.search(r"peak_rss_bytes=(\d+)", result.stdout).group(1))
    return peak / 1e9, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/tmp/llama2_convert_bench")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--keep", action="store_true", help="leave the checkpoints on disk")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    source = os.path.join(args.dir, "hf")
    config = write_random_hf(source, DTYPES[args.dtype])
    params = sum(
        np.prod(layout.torch_shapes(config)[layout.param_name(k)])
        for k in layout.per_layer_keys(config)
    )
    weight_gb = params * np.dtype(DTYPES[args.dtype]).itemsize / 1e9
    print(f"model: {params / 1e9:.2f}B parameters, {weight_gb:.2f} GB in {args.dtype}")

    runs = [
        ("imports only (convert --help)", ["convert", "--help"]),
        (
            "hf -> meta (2 shards)",
            [
                "convert",
                "--from",
                "hf",
                "--to",
                "meta",
                source,
                os.path.join(args.dir, "meta"),
                "--shards",
                "2",
            ],
        ),
        (
            "meta -> hf (1GB shards)",
            [
                "convert",
                "--from",
                "meta",
                "--to",
                "hf",
                os.path.join(args.dir, "meta"),
                os.path.join(args.dir, "hf_back"),
                "--max-shard-size",
                "1GB",
            ],
        ),
        (
            "hf -> orbax",
            ["convert", "--from", "hf", "--to", "orbax", source, os.path.join(args.dir, "orbax")],
        ),
    ]
    print(f"{'conversion':<30} {'peak RSS':>9} {'seconds':>8}")
    for name, command in runs:
        rss, seconds = peak_rss_of(command)
        print(f"{name:<30} {rss:>7.2f}GB {seconds:>8.1f}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
