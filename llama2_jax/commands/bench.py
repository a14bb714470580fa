"""`python -m llama2_jax bench train|generate`: throughput of a stage's real training step, and sampling.

`bench train` times the update step the training loop builds (`build_steps`: AdamW, clipping,
float32 master weights, the config's compute dtype, gradient accumulation) for any stage's config,
on a batch of random tokens shaped as that stage's batch, over all devices. It prints tokens/s
(the tokens the model runs through: a preference pair is two sequences), TFLOP/s per device, MFU
(6 x matmul parameters + attention per token, against the chip's dense bf16 peak) and peak device
memory. `--shape` picks a benchmark shape on the pretraining config:

    1b    dim 2048, 22 layers, 32 heads / 4 kv heads, FFN 5632, vocab 32000, batch 4 x 4096
    7bw8  Llama 2 7B width (dim 4096, 32 heads, FFN 11008), 8 layers, batch 2 x 4096
    tiny  the test model, batch 8 x 128, float32 matmuls: a CPU smoke run

    python -m llama2_jax bench train --shape 1b
    python -m llama2_jax bench train --config=configs/pretrain.py:7b --config.train.global_batch_size=8

`bench generate` is llama2_jax/commands/bench_generate.py. Results also go to
$OUT/bench_train_<name>.json when OUT is set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import ml_collections

from llama2_jax import config_cli, metrics, sharding
from llama2_jax.cli import ArgumentParser, UsageError, reports_errors
from llama2_jax.commands.aot import stage_steps
from llama2_jax.train.state import init_train_state, split_params
from llama2_jax.train.step import Steps

PRETRAIN_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "pretrain.py")
# shape: (config size, overrides of the pretraining config)
SHAPES = {
    "1b": ("7b", {"model.dim": 2048, "model.n_layers": 22, "model.n_heads": 32, "model.n_kv_heads": 4,
                  "train.global_batch_size": 4, "train.seq_len": 4096}),
    "7bw8": ("7b", {"model.n_layers": 8, "train.global_batch_size": 2, "train.seq_len": 4096}),
    "tiny": ("tiny", {"train.global_batch_size": 8, "train.seq_len": 128}),
}
DEFAULT_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}


def shape_config(shape: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """The pretraining config of a benchmark shape on this machine's devices, then `overrides`."""
    size, values = SHAPES[shape]
    config = config_cli.load_config_file(f"{PRETRAIN_CONFIG}:{size}")
    config.mesh.update(dict(ici_data=1, ici_fsdp=-1, ici_tensor=1, dcn_data=1))
    config.model.remat = "none"
    config.model.attention = DEFAULT_ATTENTION.get(jax.default_backend(), "xla")
    for key, value in values.items():
        config_cli.apply_override(config, key, str(value))
    config.model.max_seq_len = max(config.model.max_seq_len, config.train.seq_len)
    config, _ = config_cli.parse_overrides(config, overrides)
    return config


def random_state_and_batch(steps: Steps, seed: int = 0):
    """A freshly initialised train state, the frozen parameters (a model with adapters' base) and
    one batch of random tokens, laid out for `steps`."""
    task = steps.task
    model = sharding.create_model(task.model_config, steps.mesh, steps.rules, seed, task.model_class)
    _, trained, frozen = split_params(model)
    state = init_train_state(trained, steps.optimizer, steps.shardings)
    batch = task.batch_spec.synthetic(steps.global_batch_size, task.model_config.vocab_size, seed)
    return state, frozen, {name: jax.device_put(array, steps.batch_sharding) for name, array in batch.items()}


def bench_train(config: ml_collections.ConfigDict, *, timed_steps: int, warmup_steps: int) -> dict:
    """Compile, warm up and time the stage's update step; the figures as a dict."""
    steps = stage_steps(config, jax.devices())
    state, frozen, batch = random_state_and_batch(steps, config.train.seed)
    with steps.context():
        start = time.perf_counter()
        state, step_metrics = steps.train_step(state, batch, frozen)
        jax.block_until_ready(step_metrics)
        compile_s = time.perf_counter() - start
        for _ in range(warmup_steps):
            state, step_metrics = steps.train_step(state, batch, frozen)
        jax.block_until_ready(step_metrics)
        start = time.perf_counter()
        for _ in range(timed_steps):
            state, step_metrics = steps.train_step(state, batch, frozen)
        jax.block_until_ready(step_metrics)
        elapsed = time.perf_counter() - start
    model = steps.task.model_config
    return {
        "stage": config.stage,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "rows": steps.global_batch_size,
        "tokens_per_step": steps.tokens_per_step,
        "grad_accum": config.optimizer.grad_accum_steps,
        "seq_len": steps.task.batch_spec.fields[steps.task.batch_spec.model_inputs].shape[-1],
        "attention": model.attention,
        "remat": model.remat,
        "compute_dtype": model.compute_dtype,
        "compile_s": compile_s,
        "step_s": elapsed / timed_steps,
        "flops_per_token": steps.flops_per_token,
        "loss": float(step_metrics["loss"]),
        **metrics.throughput(steps.tokens_per_step * timed_steps, elapsed, steps.flops_per_token,
                             metrics.peak_flops_per_device(override=config.train.peak_flops)),
        **metrics.device_memory_gib(),
    }


def summary(name: str, result: dict) -> str:
    line = (f"{name} ({result['stage']}) on {result['devices']}x {result['device']}: "
            f"{result['tokens_per_s']:,.0f} tokens/s, {result['tflops_per_device']:.3g} TFLOP/s per device")
    if "mfu" in result:
        line += f", MFU {100 * result['mfu']:.1f} %"
    if "peak_memory_gib" in result:
        line += f", peak memory {result['peak_memory_gib']:.1f} GiB"
    return line + f", step {result['step_s'] * 1000:.1f} ms (compile {result['compile_s']:.0f} s)"


def main_train(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax bench train", description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="a benchmark shape (default: tiny on CPU, 1b elsewhere), or give --config")
    parser.add_argument("--config", metavar="FILE.py:SIZE", help="any stage's config instead of a shape")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        from llama2_jax import config_help

        config_help.print_config_help(argv)
        return 0
    config_file, _, rest = config_cli.split_flags(argv, "config")
    has_config = config_file is not None
    if has_config:
        config, rest = config_cli.parse_config_flags(argv)
    args = parser.parse_args(rest)
    if has_config and args.shape:
        raise UsageError("give --shape or --config, not both")
    name = args.shape or config_file or ("tiny" if jax.default_backend() == "cpu" else "1b")
    if not has_config:
        config = shape_config(name, [arg for arg in argv if arg.startswith("--config.")])
    result = bench_train(config, timed_steps=args.steps, warmup_steps=args.warmup)
    print(json.dumps(result))
    print(summary(name, result))
    if os.environ.get("OUT"):
        safe_name = "".join(c if c.isalnum() else "_" for c in name)
        with open(os.path.join(os.environ["OUT"], f"bench_train_{safe_name}.json"), "w") as out:
            json.dump(result, out, indent=1)
    return 0


@reports_errors
def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("train", "generate"):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m llama2_jax bench train|generate [flags]\n\n{__doc__}")
            return 0
        raise UsageError("usage: python -m llama2_jax bench train|generate [flags] (--help for each)")
    if argv[0] == "generate":
        from llama2_jax.commands import bench_generate

        return bench_generate.main(list(argv[1:]))
    return main_train(list(argv[1:]))
