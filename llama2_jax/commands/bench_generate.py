"""`python -m llama2_jax bench generate`: sampling speed, and where a decoding step's time goes.

Random weights, greedy, a 128-token prompt and 256 new tokens (EOS disabled so every row runs to
the limit), at batch 1 and 64. Per batch size it prints the two usual figures — new tokens/s and
ms per step, both over the whole call, prefill included — the decoding step alone (the whole call
minus a prefill-only call), the prefill, and the KV cache's size. Matmuls run in bfloat16 on
accelerators and float32 on CPUs, where bfloat16 is emulated and twice as slow.

The breakdown profiles one more call (`jax.profiler`) and sorts the time of every op of the
compiled program by what it does, read from the program's HLO: weight matmuls (beside what this
machine's rate on a large matmul allows for their FLOPs), attention, cache writes, sampling and
everything else, per decoding step and for the prefill. The same code reads CPU, GPU and TPU
profiles: op names come from the HLO, categories from the model's named scopes.

`--samples K` also times K sampled answers per prompt (temperature 1) two ways in one run: one
prefill per prompt shared by its K rows, and the prompts repeated K times.

Shapes: `tiny` (the test model), `40m` (vocab 32000, dim 512, 8 layers, 8 heads, FFN 1536: the
shape compared with transformers on CPUs) and `1b` (dim 2048, 22 layers, 32 heads / 4 kv heads,
FFN 5632, vocab 32000).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama2_jax import sharding
from llama2_jax.cli import ArgumentParser
from llama2_jax.generate import SamplingParams, compiled_program, decoding_layout, generate
from llama2_jax.model import axes
from llama2_jax.model.config import LlamaConfig

SHAPES = {
    "tiny": LlamaConfig.from_preset("tiny", max_seq_len=512),
    "40m": LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, multiple_of=256, max_seq_len=512),
    "1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),
}
CATEGORIES = ("matmuls", "attention", "cache_write", "sampling", "other")


def time_call(function, repeats: int) -> float:
    """Best wall time of `repeats` calls, after one untimed call that compiles."""
    jax.block_until_ready(function())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(dtype: str) -> float:
    """FLOP/s of this machine's first device on one large square matmul: what matmuls can reach."""
    size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((size, size), dtype)
    product = jax.jit(lambda a: a @ a)
    return 2 * size**3 / time_call(lambda: product(a), 3)


def matmul_parameters(decoding_state: nnx.State) -> int:
    """Weights every decoded token multiplies by: all but the embedding table (a gather) and norms."""
    total = 0
    for _, variable in nnx.to_flat_state(decoding_state):
        names = variable.get_metadata().get("logical_axes") or ()
        if axes.NORM not in names and tuple(names) != (axes.VOCAB, axes.EMBED):
            total += variable[...].size
    return total


# ---- the profile --------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_MATMUL = re.compile(r" dot\(|custom_call_target=\"[^\"]*(?:gemm|matmul|Matmul)")
# Ops whose time is the time of the ops they run, which the profile reports on their own.
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def op_categories(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """HLO op name → (category, whether it runs in the decoding loop rather than the prefill)."""
    computation, matmul_computations, instructions = None, set(), {}
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        if computation and _MATMUL.search(line):
            matmul_computations.add(computation)
        match, op_name = _INSTRUCTION.match(line), _OP_NAME.search(line)
        if match and op_name and match.group(2) not in _CONTAINERS:
            called = _CALLS.search(line)
            # A matrix-vector product (batch 1) is rewritten into a multiply and a reduction; its
            # op name still says dot_general.
            is_matmul = (bool(_MATMUL.search(line)) or op_name.group(1).endswith("dot_general")
                         or (called is not None and called.group(1) in matmul_computations))
            instructions[match.group(1)] = (op_name.group(1), is_matmul)
    categories = {}
    for name, (op_name, is_matmul) in instructions.items():
        scope = next((c for c in ("attention", "cache_write", "sampling") if f"/{c}/" in op_name + "/"), None)
        # A fusion is named after its last op: a weight matmul fused with the sampling that reads
        # its output is still a matmul; attention's own matmuls stay attention.
        if scope != "attention" and is_matmul:
            scope = "matmuls"
        categories[name] = (scope or "other", "/while/body/" in op_name)
    return categories


def profile_breakdown(run, hlo_text: str, steps: int) -> dict:
    """Milliseconds by category, per decoding step and for the prefill, from a profile of `run()`."""
    categories = op_categories(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            jax.block_until_ready(run())
        (path,) = [os.path.join(root, name) for root, _, names in os.walk(directory)
                   for name in names if name.endswith(".trace.json.gz")]
        with gzip.open(path) as file:
            events = json.load(file)["traceEvents"]
    # Accelerators report each op twice (its launch on the host, its kernel on the device): keep
    # the device's events where there are any.
    device_pids = {event["pid"] for event in events if event.get("ph") == "M" and event.get("name") == "process_name"
                   and "/device:" in str(event.get("args", {}).get("name", ""))}
    totals = {"step": collections.Counter(), "prefill": collections.Counter()}
    for event in events:
        op = event.get("args", {}).get("hlo_op")
        if event.get("ph") != "X" or op not in categories or (device_pids and event["pid"] not in device_pids):
            continue
        category, in_loop = categories[op]
        totals["step" if in_loop else "prefill"][category] += event["dur"] / 1000
    return {
        "step_ms": {c: totals["step"][c] / steps for c in CATEGORIES},
        "prefill_ms": {c: totals["prefill"][c] for c in CATEGORIES},
    }


# ---- the runs -----------------------------------------------------------------------------------


def bench_batch(model, decoding_state, batch: int, prompt_length: int, new_tokens: int, repeats: int,
                rate: float, breakdown: bool) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, model.config.vocab_size, (batch, prompt_length)).tolist()
    keywords = dict(eos_id=-1, decoding_state=decoding_state)

    def run(max_new_tokens: int):
        return lambda: generate(model, prompts, max_new_tokens=max_new_tokens, **keywords).tokens

    total = time_call(run(new_tokens), repeats)
    prefill = time_call(run(1), repeats)
    config = model.config
    cache_bytes = (2 * config.n_layers * batch * config.n_kv_heads * config.head_dim
                   * (prompt_length + new_tokens) * jnp.dtype(config.compute_dtype).itemsize)
    flops = 2 * batch * matmul_parameters(decoding_state[1])
    figures = {
        "batch": batch,
        "new_tokens_per_s": batch * new_tokens / total,
        "ms_per_step": total / new_tokens * 1000,
        "decode_ms_per_step": (total - prefill) / (new_tokens - 1) * 1000,
        "prefill_ms": prefill * 1000,
        "kv_cache_mib": cache_bytes / 2**20,
        "matmul_floor_ms_per_step": flops / rate * 1000,
    }
    if breakdown:
        program = compiled_program(model, prompts, max_new_tokens=new_tokens, **keywords)
        figures["breakdown"] = profile_breakdown(run(new_tokens), program.as_text(), new_tokens - 1)
    return figures


def bench_samples(model, decoding_state, prompts_count: int, samples: int, prompt_length: int, new_tokens: int,
                  repeats: int) -> dict:
    """K sampled answers per prompt: one shared prefill per prompt against the prompts repeated K times."""
    rng = np.random.default_rng(samples)
    prompts = rng.integers(3, model.config.vocab_size, (prompts_count, prompt_length)).tolist()
    keywords = dict(max_new_tokens=new_tokens, eos_id=-1, decoding_state=decoding_state,
                    sampling=SamplingParams(temperature=1.0))
    shared = time_call(lambda: generate(model, prompts, samples=samples, **keywords).tokens, repeats)
    repeated_prompts = [prompt for prompt in prompts for _ in range(samples)]
    repeated = time_call(lambda: generate(model, repeated_prompts, **keywords).tokens, repeats)
    return {"prompts": prompts_count, "samples": samples,
            "shared_prefill_samples_per_s": prompts_count * samples / shared,
            "repeated_prompts_samples_per_s": prompts_count * samples / repeated}


def describe(figures: dict) -> str:
    line = (f"batch {figures['batch']}: {figures['new_tokens_per_s']:,.1f} new tokens/s, "
            f"{figures['decode_ms_per_step']:.2f} ms per decoding step (matmul FLOPs at this machine's rate: "
            f"{figures['matmul_floor_ms_per_step']:.2f} ms), prefill {figures['prefill_ms']:.1f} ms, "
            f"KV cache {figures['kv_cache_mib']:.1f} MiB")
    if "breakdown" in figures:
        for phase in ("step_ms", "prefill_ms"):
            parts = figures["breakdown"][phase]
            line += f"\n  {'per step' if phase == 'step_ms' else 'prefill '} (profiled, ms): " + ", ".join(
                f"{name} {parts[name]:.2f}" for name in CATEGORIES) + f"; total {sum(parts.values()):.2f}"
    return line


def main(argv: Sequence[str]) -> int:
    """CLI entry point: prints one JSON line and a summary per batch size; writes $OUT/generate_bench.json if set."""
    parser = ArgumentParser(prog="python -m llama2_jax bench generate", description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b" if jax.default_backend() == "gpu" else "tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    parser.add_argument("--samples", type=int, default=1,
                        help="K > 1: also time K answers per prompt, shared prefill against repeated prompts")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled call")
    args = parser.parse_args(argv)
    if args.samples < 1 or min(args.batch) < 1 or args.new_tokens < 2:
        parser.error("--samples and --batch must be >= 1 and --new-tokens >= 2")
    config = SHAPES[args.shape].replace(compute_dtype=args.compute_dtype)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_model(config, mesh)
    decoding_state = decoding_layout(model)
    rate = matmul_rate(args.compute_dtype)
    results = {"shape": args.shape, "compute_dtype": args.compute_dtype, "device": jax.devices()[0].device_kind,
               "matmul_tflops": rate / 1e12, "runs": []}
    print(json.dumps({key: value for key, value in results.items() if key != "runs"}))
    for batch in args.batch:
        figures = bench_batch(model, decoding_state, batch, args.prompt_length, args.new_tokens, args.repeats,
                              rate, breakdown=not args.no_breakdown)
        results["runs"].append(figures)
        print(json.dumps(figures), flush=True)
        print(describe(figures), flush=True)
    if args.samples > 1:
        for batch in args.batch:
            prompts_count = max(1, batch // args.samples)
            figures = bench_samples(model, decoding_state, prompts_count, args.samples, args.prompt_length,
                                    args.new_tokens, args.repeats)
            results.setdefault("samples", []).append(figures)
            print(json.dumps(figures), flush=True)
            print(f"{prompts_count} prompts x {args.samples} samples: "
                  f"{figures['shared_prefill_samples_per_s']:,.1f} samples/s with one prefill per prompt, "
                  f"{figures['repeated_prompts_samples_per_s']:,.1f} with the prompts repeated", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "generate_bench.json"), "w") as file:
            json.dump(results, file, indent=1)
    return 0
