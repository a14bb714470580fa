"""`python -m llama2_jax aot`: compile the real training step for a TPU topology, on any machine.

    python -m llama2_jax aot --config=configs/pretrain.py:70b --topology=v5p:8x8x8 \
        --config.optimizer.grad_accum_steps=2 [--config.model.attention=splash] [--num-slices=2]

libtpu's compiler builds the loop's own update step (same model, optimizer, shardings, donation and
gradient accumulation as `python -m llama2_jax train` with this config) for a pod that is not here,
and prints what one chip would hold: whether a config fits before renting the pod. The train state
and the batch are shapes with shardings only; nothing is allocated. Needs `jax[tpu]` of the same
version as jax, best in its own virtualenv (with libtpu installed, jax looks for TPUs at start-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax import metrics, sharding
from llama2_jax.config_cli import parse_config_flags
from llama2_jax.data.pipeline import BATCH_FIELDS
from llama2_jax.model.config import LlamaConfig
from llama2_jax.train import optim
from llama2_jax.train.loop import check_batch_layout
from llama2_jax.train.losses import make_next_token_loss
from llama2_jax.train.state import abstract_train_state, train_state_shardings
from llama2_jax.train.step import make_train_step

# HBM per chip, by the generation that starts the topology name. v4 is left out: libtpu describes
# it one device per core, and meshes on v4 want one per chip (megacore).
HBM_GIB = {"v5p": 95, "v5e": 16, "v6e": 32}
# Every host of these generations drives four chips, 2 x 2.
CHIPS_PER_HOST = (2, 2, 1)
GIB = float(2**30)


class AotError(RuntimeError):
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


def abstract_batch(train_config: ml_collections.ConfigDict, where: NamedSharding) -> dict:
    """One global batch as the data pipeline delivers it, as shapes."""
    shape = (train_config.global_batch_size, train_config.seq_len)
    return {
        name: jax.ShapeDtypeStruct(shape, "float32" if name == "loss_weights" else "int32", sharding=where)
        for name in BATCH_FIELDS
    }


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
    """The compiled update step of `train` with `config`, on a mesh over `devices`."""
    model_config = LlamaConfig.from_dict(config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    rules = tuple(tuple(rule) for rule in config.rules)
    grad_accum_steps = config.optimizer.grad_accum_steps
    check_batch_layout(config.train, grad_accum_steps, mesh, rules)
    sharding.check_platform(model_config, mesh)

    optimizer, schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    graphdef, abstract_state = sharding.abstract_model(model_config)
    sharding.check_fits_mesh(abstract_state, mesh, rules)
    shardings = train_state_shardings(abstract_state, optimizer, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    loss_fn = make_next_token_loss(z_loss_weight=config.train.z_loss_weight)

    with sharding.logical_context(mesh, rules):
        train_step = jax.jit(
            make_train_step(graphdef, loss_fn, optimizer, schedule, grad_accum_steps),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )
        lowered = train_step.lower(
            abstract_train_state(abstract_state, optimizer, shardings),
            abstract_batch(config.train, batch_sharding),
        )
    return mesh, model_config, lowered.compile()


def report(compiled, hbm_gib: float) -> list[str]:
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
    verdict = "fits" if total <= hbm_gib * GIB else "does NOT fit"
    lines.append(f"  {verdict} in {hbm_gib} GiB of HBM ({100 * total / (hbm_gib * GIB):.0f} %)")
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) and costs else costs
    if costs and costs.get("flops"):
        # XLA counts a loop body once: the layer scan and the micro-batch scan are not multiplied out.
        lines.append(f"FLOPs per chip, loop bodies counted once (XLA cost analysis): {costs['flops']:.4g}")
    return lines


def _fit_hints(config: ml_collections.ConfigDict) -> str:
    hints = ["more micro-batches (optimizer.grad_accum_steps)"]
    if config.model.remat != "full":
        hints.append("model.remat=full")
    if config.model.attention != "splash":
        hints.append("model.attention=splash")
    return "to fit: " + ", ".join(hints) + ", or more chips"


def main(argv: Sequence[str]) -> int:
    try:
        config, rest = parse_config_flags(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax aot", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--topology", required=True, help="TPU generation:shape, e.g. v5p:4x4x4")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN")
    args = parser.parse_args(rest)

    try:
        devices = topology_devices(args.topology, args.num_slices)
        start = time.perf_counter()
        mesh, model_config, compiled = compile_train_step(config, devices)
    except (AotError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler refuses a program that cannot fit, so there is no analysis to print.
        print(f"does NOT fit on {args.topology}: {error}\n{_fit_hints(config)}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start

    train = config.train
    tokens = train.global_batch_size * train.seq_len
    model_flops = metrics.flops_per_token(model_config, train.seq_len) * tokens / len(devices)
    print(
        f"train step for {args.topology} x {args.num_slices} slice(s) = {len(devices)} chips "
        f"({devices[0].device_kind}), mesh {dict(mesh.shape)}; compiled in {seconds:.0f} s\n"
        f"model: dim {model_config.dim}, {model_config.n_layers} layers, attention "
        f"{model_config.attention}, remat {model_config.remat}; batch {train.global_batch_size} x "
        f"{train.seq_len} in {config.optimizer.grad_accum_steps} micro-batch(es)"
    )
    print("\n".join(report(compiled, HBM_GIB[args.topology.partition(":")[0]])))
    print(f"FLOPs per chip per step (DESIGN.md's count): {model_flops:.4g}")
    return 0
