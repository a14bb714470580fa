"""`python -m llama2_jax bench train|generate`: throughput of the real training step, and sampling.

`bench train` times the loop's own update step (AdamW, clipping, float32 master weights, bf16
matmuls, optional accumulation) on random tokens over all devices, and prints tokens/s, TFLOP/s per
device, MFU (DESIGN.md's FLOP count against the chip's bf16 peak) and peak device memory. Shapes are
DESIGN.md's, comparable with shared/bench/anchor_gpu.py on the same card:

    1b    dim 2048, 22 layers, 32 heads / 4 kv heads, FFN 5632, vocab 32000, batch 4 x 4096
    7bw8  Llama 2 7B width (dim 4096, 32 heads, FFN 11008), 8 layers, batch 2 x 4096
    tiny  the test model, batch 8 x 128, float32 matmuls: a CPU smoke run

`bench generate` is llama2_jax/generate_bench.py. Results also go to $OUT/bench_train_<shape>.json
when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from llama2_jax import metrics, sharding
from llama2_jax.model.config import LlamaConfig
from llama2_jax.train.losses import make_next_token_loss
from llama2_jax.train.optim import PAPER_OPTIMIZER, make_optimizer
from llama2_jax.train.state import init_train_state, param_dict, train_state_shardings
from llama2_jax.train.step import make_train_step

# shape: (model config, batch, seq_len)
SHAPES = {
    "1b": (LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4), 4, 4096),
    "7bw8": (LlamaConfig.from_preset("7b", n_layers=8), 2, 4096),
    "tiny": (LlamaConfig.from_preset("tiny", compute_dtype="float32"), 8, 128),
}
DEFAULT_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}


def random_batch(config: LlamaConfig, rows: int, seq_len: int, mesh) -> dict[str, jax.Array]:
    """Full rows of random tokens, one document each: the anchor's workload."""
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (rows, seq_len + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_weights": np.ones((rows, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)),
        "segment_ids": np.ones((rows, seq_len), np.int32),
    }
    where = sharding.batch_sharding(mesh)
    return {name: jax.device_put(np.ascontiguousarray(array), where) for name, array in batch.items()}


def bench_train(args: argparse.Namespace) -> dict:
    config, batch_size, seq_len = SHAPES[args.shape]
    platform = jax.default_backend()
    config = config.replace(
        attention=args.attention or DEFAULT_ATTENTION.get(platform, "xla"),
        remat=args.remat,
        max_seq_len=max(config.max_seq_len, seq_len),
    )
    batch_size = args.batch or batch_size
    mesh = sharding.make_mesh(dict(ici_data=1, ici_fsdp=-1, ici_tensor=args.tensor, dcn_data=1))
    rules = sharding.DEFAULT_RULES
    optimizer, schedule = make_optimizer(PAPER_OPTIMIZER, total_steps=1000)
    model = sharding.create_model(config, mesh, rules)
    graphdef, params = param_dict(model)
    shardings = train_state_shardings(sharding.abstract_model(config)[1], optimizer, mesh, rules)
    state = init_train_state(params, optimizer, shardings)
    del model, params
    rows = batch_size * args.grad_accum
    batch = random_batch(config, rows, seq_len, mesh)
    with sharding.logical_context(mesh, rules):
        step = jax.jit(
            make_train_step(graphdef, make_next_token_loss(), optimizer, schedule, args.grad_accum),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        start = time.perf_counter()
        state, step_metrics = step(state, batch)
        jax.block_until_ready(step_metrics)
        compile_s = time.perf_counter() - start
        for _ in range(args.warmup):
            state, step_metrics = step(state, batch)
        jax.block_until_ready(step_metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, step_metrics = step(state, batch)
        jax.block_until_ready(step_metrics)
        elapsed = time.perf_counter() - start
    flops_per_token = metrics.flops_per_token(config, seq_len)
    peak = metrics.peak_flops_per_device(override=args.peak_flops)
    result = {
        "shape": args.shape,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch": batch_size,
        "grad_accum": args.grad_accum,
        "seq_len": seq_len,
        "attention": config.attention,
        "remat": config.remat,
        "compute_dtype": config.compute_dtype,
        "compile_s": compile_s,
        "step_s": elapsed / args.steps,
        "flops_per_token": flops_per_token,
        "loss": float(step_metrics["loss"]),
        **metrics.throughput(rows * seq_len * args.steps, elapsed, flops_per_token, peak),
        **metrics.device_memory_gib(),
    }
    return result


def _summary(result: dict) -> str:
    line = (
        f"{result['shape']} on {result['devices']}x {result['device']}: "
        f"{result['tokens_per_s']:,.0f} tokens/s, {result['tflops_per_device']:.3g} TFLOP/s per device"
    )
    if "mfu" in result:
        line += f", MFU {100 * result['mfu']:.1f} %"
    if "peak_memory_gib" in result:
        line += f", peak memory {result['peak_memory_gib']:.1f} GiB"
    return line + f", step {result['step_s'] * 1000:.1f} ms (compile {result['compile_s']:.0f} s)"


def main_train(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax bench train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_shape = "tiny" if jax.default_backend() == "cpu" else "1b"
    parser.add_argument("--shape", choices=sorted(SHAPES), default=default_shape)
    parser.add_argument("--batch", type=int, default=0, help="rows per micro-batch (0: the shape's)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    parser.add_argument("--remat", default="none", help="remat policy (model/config.py REMAT_POLICIES)")
    parser.add_argument("--attention", default="", help="xla | cudnn | splash (default: by platform)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices (rest: fsdp)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="FLOP/s per device for MFU")
    args = parser.parse_args(argv)
    result = bench_train(args)
    print(json.dumps(result))
    print(_summary(result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"bench_train_{args.shape}.json"), "w") as out:
            json.dump(result, out, indent=1)
    return 0


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("train", "generate"):
        print("usage: python -m llama2_jax bench train|generate [flags]  (--help for each)", file=sys.stderr)
        return 2
    if argv[0] == "generate":
        from llama2_jax import generate_bench

        return generate_bench.main(list(argv[1:]))
    return main_train(list(argv[1:]))
