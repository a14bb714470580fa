"""`python -m llama2_jax bench generate`: sampling speed, as Hugging Face `generate` is usually timed.

Random weights, greedy, a 128-token prompt and 256 new tokens (EOS disabled so every row runs to
the limit), at batch 1 and 64. Prints, per batch size, the two usual figures — new tokens/s and
ms per step, both over the whole call, prefill included — plus the decoding step alone (the whole
call minus a prefill-only call). Matmuls run in bfloat16 on accelerators and float32 on CPUs, where
bfloat16 is emulated and twice as slow. Shapes: `tiny` (the test model, for CPUs) and `1b` (the 1.1B
benchmark shape: dim 2048, 22 layers, 32 heads / 4 kv heads, FFN 5632, vocab 32000).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from llama2_jax import sharding
from llama2_jax.cli import ArgumentParser
from llama2_jax.generate import decoding_layout, generate
from llama2_jax.model.config import LlamaConfig

SHAPES = {
    "tiny": LlamaConfig.from_preset("tiny", max_seq_len=512),
    "1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),
}


def time_call(function, repeats: int) -> float:
    """Best wall time of `repeats` calls, after one untimed call that compiles."""
    jax.block_until_ready(function())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        best = min(best, time.perf_counter() - start)
    return best


def bench_batch(model, decoding_state, batch: int, prompt_length: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, model.config.vocab_size, (batch, prompt_length)).tolist()

    def run(max_new_tokens: int):
        return lambda: generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_id=-1, decoding_state=decoding_state
        ).tokens

    total = time_call(run(new_tokens), repeats)
    prefill = time_call(run(1), repeats)
    return {
        "batch": batch,
        "new_tokens_per_s": batch * new_tokens / total,
        "ms_per_step": total / new_tokens * 1000,
        "decode_ms_per_step": (total - prefill) / (new_tokens - 1) * 1000,
        "prefill_ms": prefill * 1000,
    }


def main(argv: Sequence[str]) -> int:
    """CLI entry point: prints one JSON line per batch size; writes $OUT/generate_bench.json if set."""
    parser = ArgumentParser(prog="python -m llama2_jax bench generate", description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b" if jax.default_backend() == "gpu" else "tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    args = parser.parse_args(argv)
    config = SHAPES[args.shape].replace(compute_dtype=args.compute_dtype)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_model(config, mesh)
    decoding_state = decoding_layout(model)
    results = {"shape": args.shape, "compute_dtype": args.compute_dtype,
               "device": jax.devices()[0].device_kind, "runs": []}
    print(json.dumps({key: value for key, value in results.items() if key != "runs"}))
    for batch in args.batch:
        figures = bench_batch(model, decoding_state, batch, args.prompt_length, args.new_tokens, args.repeats)
        results["runs"].append(figures)
        print(json.dumps({key: round(value, 3) for key, value in figures.items()}), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "generate_bench.json"), "w") as file:
            json.dump(results, file, indent=1)
    return 0
