"""`python -m llama2_jax aot`: compile a stage's real training step ahead of time, on any machine.

    python -m llama2_jax aot --config=configs/pretrain.py:70b --topology=v5p:8x8x8 \
        --config.optimizer.grad_accum_steps=2 [--config.model.attention=splash] [--num-slices=2]
    python -m llama2_jax aot --config=configs/pretrain.py:tiny --topology=cpu

The step is built by the same `build_steps` the training loop uses, for whatever stage the config is
for (same model, loss, optimizer, shardings, donation and gradient accumulation), and compiled for a
TPU pod that is not here by libtpu's compiler, or for this machine's own devices (`cpu`); it prints
what one device would hold: whether a config fits before renting the pod. The train state and the
batch are shapes with shardings only; nothing is allocated. TPU topologies need `jax[tpu]` of the
same version as jax, best in its own virtualenv (with libtpu installed, jax looks for TPUs at
start-up).
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Sequence

import jax
import ml_collections
from jax.experimental import topologies

from llama2_jax import config_cli, sharding, stages
from llama2_jax.cli import ArgumentParser, reports_errors
from llama2_jax.stages.initial import model_for_compiling
from llama2_jax.train.step import Steps, build_steps

# HBM per chip, by the generation that starts the topology name. v4 is left out: libtpu describes
# it one device per core, and meshes on v4 want one per chip (megacore).
HBM_GIB = {"v5p": 95, "v5e": 16, "v6e": 32}
# Every host of these generations drives four chips, 2 x 2.
CHIPS_PER_HOST = (2, 2, 1)
GIB = float(2**30)


class AotError(ValueError):
    """A topology or installation that cannot compile, with what to do instead."""


def topology_devices(topology: str, num_slices: int) -> list[jax.Device]:
    """Compile-only devices of `num_slices` slices of `topology` (e.g. "v5p:4x4x4")."""
    generation = topology.partition(":")[0]
    if generation not in HBM_GIB:
        raise AotError(f"unknown TPU generation in --topology={topology}; use one of {sorted(HBM_GIB)}")
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(
            "compiling for TPU needs libtpu, which is not installed here; make a separate "
            f"virtualenv and pip install 'jax[tpu]=={jax.__version__}' in it"
        )
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology,
            chips_per_host_bounds=CHIPS_PER_HOST, num_slices=num_slices,
        )
    except jax.errors.JaxRuntimeError as error:
        raise AotError(f"libtpu rejects --topology={topology}: {error}") from None
    return list(description.devices)


def stage_steps(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Steps:
    """The steps the training loop would build for `config`, on a mesh over `devices`: of the model its
    initial checkpoint holds, where it has one to read, as the stage itself would train it."""
    stage = stages.stage_module(config.stage)
    model_for_compiling(config)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    # A stage trained by epochs learns its length from its data; the compiled step does not depend on it.
    return build_steps(stage.make_task(config), config, mesh, tuple(tuple(rule) for rule in config.rules),
                       schedule_steps=max(config.train.steps, 1))


def report(compiled, hbm_gib: float | None) -> list[str]:
    """Per-chip memory from the compiler, and its FLOP count when it gives one."""
    memory = compiled.memory_analysis()
    # Donated train-state buffers are reused for the new state: outputs aliasing them cost nothing.
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    rows = [
        ("arguments", memory.argument_size_in_bytes, "train state and batch shard"),
        ("outputs", memory.output_size_in_bytes, "new train state and metrics"),
        ("aliased", -memory.alias_size_in_bytes, "outputs written over donated arguments"),
        ("temporaries", memory.temp_size_in_bytes, "activations, gradients, collectives"),
        ("generated code", memory.generated_code_size_in_bytes, ""),
        ("total", total, ""),
    ]
    lines = ["per-chip memory:"]
    lines += [f"  {name:<15}{size / GIB:9.2f} GiB  {why}".rstrip() for name, size, why in rows]
    verdict = "fits" if hbm_gib and total <= hbm_gib * GIB else "does NOT fit"
    if hbm_gib:
        lines.append(f"  {verdict} in {hbm_gib} GiB of HBM ({100 * total / (hbm_gib * GIB):.0f} %)")
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) and costs else costs
    if costs and costs.get("flops"):
        # XLA counts a loop body once: the layer scan and the micro-batch scan are not multiplied out.
        lines.append(f"FLOPs per chip, loop bodies counted once (XLA cost analysis): {costs['flops']:.4g}")
    return lines


def _fit_hints(config: ml_collections.ConfigDict, steps: Steps) -> str:
    hints = []
    shards = sharding.batch_shard_count(steps.mesh, steps.rules)
    if config.train.global_batch_size // (config.optimizer.grad_accum_steps * shards) > 1:
        hints.append("more micro-batches (optimizer.grad_accum_steps)")
    if config.model.remat != "full":
        hints.append("model.remat=full")
    if config.model.attention != "splash":
        hints.append("model.attention=splash")
    # Below one example per chip, only tensor parallelism splits the activations further.
    hints.append("mesh.ici_tensor=4 (heads, MLP and the residual stream split over 4 chips)"
                 if config.mesh.ici_tensor == 1 else "a larger mesh.ici_tensor")
    return "to fit: " + ", ".join(hints) + ", or more chips"


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax aot", description=__doc__)
    parser.add_argument("--config", metavar="FILE.py:SIZE", help="any stage's config, e.g. configs/pretrain.py:7b")
    parser.add_argument("--topology", required=True,
                        help="TPU generation:shape, e.g. v5p:4x4x4, or cpu for this machine's devices")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        from llama2_jax import config_help

        config_help.print_config_help(argv)
        return 0
    config, rest = config_cli.parse_config_flags(argv)
    args = parser.parse_args(rest)

    devices = jax.devices() if args.topology == "cpu" else topology_devices(args.topology, args.num_slices)
    start = time.perf_counter()
    steps = stage_steps(config, devices)
    try:
        compiled = steps.lower_train_step().compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler refuses a program that cannot fit, so there is no analysis to print.
        raise AotError(f"does NOT fit on {args.topology}: {str(error).splitlines()[0]}; {_fit_hints(config, steps)}") from None
    seconds = time.perf_counter() - start

    model, train = steps.task.model_config, config.train
    print(
        f"{config.stage} train step for {args.topology} x {args.num_slices} slice(s) = {len(devices)} devices "
        f"({devices[0].device_kind}), mesh {dict(steps.mesh.shape)}; compiled in {seconds:.0f} s\n"
        f"model: dim {model.dim}, {model.n_layers} layers, attention {model.attention}, remat {model.remat}; "
        f"batch {train.global_batch_size} rows of {steps.task.batch_spec.model_tokens_per_row()} tokens in "
        f"{config.optimizer.grad_accum_steps} micro-batch(es)"
    )
    print("\n".join(report(compiled, HBM_GIB.get(args.topology.partition(":")[0]))))
    model_flops = steps.flops_per_token * steps.tokens_per_step / len(devices)
    print(f"model FLOPs per device per step (6 x matmul parameters + attention, per token): {model_flops:.4g}")
    return 0
