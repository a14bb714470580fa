"""The README's AOT table: for each stage and size, the smallest TPU slice its training step fits on.

    python scripts/aot_table.py --stages pretrain sft reward --sizes 7b 13b \
        --topologies v5p:2x2x4 v5p:4x4x4 v5p:4x4x8 --rows-per-chip 1 --set model.attention=splash
    python scripts/aot_table.py --stages pretrain --sizes 70b --topologies v5e:8x16 v5e:16x16 \
        --tensor 4 8 --set model.attention=splash --set model.remat=full

For every (stage, size) the topologies are tried in the order given, and on each the tensor sizes
(`mesh.ici_tensor`) in the order given, each by `python -m llama2_jax aot` in a fresh process,
until one fits; the micro-batches (optimizer.grad_accum_steps) are chosen so
that each batch shard holds `--rows-per-chip` examples per micro-batch (the batch is sharded by
example over the data and fsdp devices: at least one text row, dialog row or preference pair, two
sequences, per chip, or per group of `mesh.ici_tensor` chips). Prints one markdown row per
(stage, size): the slice that fits with its per-chip memory, or the last one tried and the
compiler's verdict. Needs libtpu (`pip install "jax[tpu]==<jax version>"`, in its own virtualenv);
each compile takes minutes on a laptop.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama2_jax.config_cli import apply_override, load_config_file  # noqa: E402  (the checkout's own package)


def load_config(stage: str, size: str, settings: list[str]):
    config = load_config_file(f"{REPO / 'configs' / stage}.py:{size}")
    for setting in settings:
        key, _, value = setting.partition("=")
        apply_override(config, key, value)
    return config


def chips(topology: str) -> int:
    shape = topology.partition(":")[2]
    count = 1
    for side in shape.split("x"):
        count *= int(side)
    return count


def try_topology(stage: str, size: str, topology: str, rows_per_chip: int, settings: list[str]) -> dict:
    """One `aot` compile; what it printed, parsed: fits, total GiB, micro-batches, seconds."""
    config = load_config(stage, size, settings)
    tensor = config.mesh.ici_tensor * config.mesh.dcn_tensor
    if tensor > chips(topology):
        return {"topology": topology, "tensor": tensor, "micro_batches": None, "fits": False, "total_gib": None,
                "seconds": None, "verdict": f"not tried: tensor {tensor} on {chips(topology)} chips"}
    # The batch is split over the data and fsdp devices; tensor devices share their examples.
    batch_shards = chips(topology) // tensor
    micro_batches = max(1, config.train.global_batch_size // (batch_shards * rows_per_chip))
    command = [sys.executable, "-m", "llama2_jax", "aot", f"--config={REPO / 'configs' / stage}.py:{size}",
               f"--topology={topology}", f"--config.optimizer.grad_accum_steps={micro_batches}",
               *(f"--config.{setting}" for setting in settings)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    output = finished.stdout + finished.stderr
    total = re.search(r"total\s+([\d.]+) GiB", output)
    seconds = re.search(r"compiled in (\d+) s", output)
    return {
        "topology": topology, "tensor": tensor, "micro_batches": micro_batches, "fits": "fits in" in output,
        "total_gib": float(total.group(1)) if total else None,
        "seconds": int(seconds.group(1)) if seconds else None,
        "verdict": next((line.strip() for line in output.splitlines() if "fit" in line),
                        output.strip().splitlines()[-1] if output.strip() else f"exit status {finished.returncode}"),
    }


def row(stage: str, size: str, result: dict, settings: list[str]) -> str:
    memory = f"{result['total_gib']:.1f} GiB" if result["total_gib"] is not None else result["verdict"]
    status = "fits" if result["fits"] else "does not fit"
    return (f"| {stage} | {size} | {result['topology']} ({chips(result['topology'])} chips) | {result['tensor']} | "
            f"{result['micro_batches']} | {', '.join(settings) or 'defaults'} | {memory} | {status} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sft", "reward"])
    parser.add_argument("--sizes", nargs="+", default=["7b", "13b", "34b", "70b"])
    parser.add_argument("--topologies", nargs="+", required=True, help="tried in this order, smallest first")
    parser.add_argument("--rows-per-chip", type=int, default=1,
                        help="examples per batch shard per micro-batch (a preference pair is one)")
    parser.add_argument("--tensor", nargs="+", type=int, default=[1],
                        help="mesh.ici_tensor sizes tried on each topology, in this order")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for every compile, e.g. model.attention=splash")
    args = parser.parse_args()
    print("| stage | size | smallest slice tried that fits | tensor | micro-batches | settings | per chip | |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in args.stages:
        for size in args.sizes:
            for topology, tensor in ((t, n) for t in args.topologies for n in args.tensor):
                settings = [*args.set, f"mesh.ici_tensor={tensor}"]
                result = try_topology(stage, size, topology, args.rows_per_chip, settings)
                print(f"  {stage} {size} {topology} tensor {tensor}: {result['verdict']} ({result['seconds']} s)",
                      file=sys.stderr)
                if result["fits"]:
                    break
            print(row(stage, size, result, args.set), flush=True)


if __name__ == "__main__":
    main()
