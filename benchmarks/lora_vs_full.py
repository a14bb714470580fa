"""SFT, DPO, PPO and GRPO with every weight trained and with low-rank adapters, side by side on the
bundled demo.

Each stage runs with its own `tiny` config from the README's runs (runs/tiny for SFT, runs/sft for
DPO, runs/rejection and both reward models for PPO and GRPO): once training every weight, and once
per adapter setting (`RANK` on a float base, or `RANK:int8` / `RANK:int4` on a quantized one) at
ten times the learning rate (the usual ratio: QLoRA fine-tunes at 2e-4 where full fine-tuning
takes 2e-5). Every run is its own `python -m llama2_jax` process in a scratch directory; the script
prints one Markdown table: parameters trained, the bytes of the train state (float32 weights, two
AdamW moments and a gradient for what trains: 16 bytes a parameter; the frozen base as stored, an
int4 level half a byte), the median seconds per step after compilation, and the held-out result
(SFT: the answer loss; DPO: the implicit reward's accuracy; PPO and GRPO: the mean combined reward
of the held-out prompts' answers), all read back from each run's workdir.

    python benchmarks/lora_vs_full.py [--runs 0 8 16 8:int4] [--stages sft dpo] [--sft-steps 100] [--dpo-steps 40]
    python benchmarks/lora_vs_full.py --stages ppo grpo --runs 0 8 [--iterations 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing the package

from flax import nnx  # noqa: E402

from llama2_jax.metrics import read_metrics  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402
from llama2_jax.model.llama import TRAINED_KINDS  # noqa: E402
from llama2_jax.model.quantize import stored_bits  # noqa: E402
from llama2_jax.train.state import split_model  # noqa: E402

STAGES = {  # stage: (config, initial checkpoint, held-out figure, its name, the stage's learning rate)
    "sft": ("configs/sft.py:tiny", "runs/tiny", "eval_loss", "held-out answer loss", 1e-3),
    "dpo": ("configs/dpo.py:tiny", "runs/sft", "eval_accuracy", "held-out implicit-reward accuracy", 1e-5),
    "ppo": ("configs/ppo.py:tiny", "runs/rejection", "eval_reward_combined", "held-out mean combined reward", 6e-5),
    "grpo": ("configs/grpo.py:tiny", "runs/rejection", "eval_reward_combined", "held-out mean combined reward", 6e-5),
}
ON_POLICY = ("ppo", "grpo")  # their length is in iterations, and their loop's workdir is WORKDIR/train


def run(stage: str, rank: int, base_dtype: str, steps: int, workdir: str) -> float:
    config, init, _, _, peak_lr = STAGES[stage]
    length = ([f"--config.{stage}.iterations={steps}", "--config.train.eval_every=100000"] if stage in ON_POLICY
              else [f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
                    f"--config.train.checkpoint_every={steps}"])
    argv = [sys.executable, "-m", "llama2_jax", stage, f"--config={config}", f"--config.init_checkpoint={init}",
            f"--workdir={workdir}", *length, f"--config.lora.rank={rank}", f"--config.lora.base_dtype={base_dtype}",
            f"--config.optimizer.peak_lr={peak_lr * (10 if rank else 1)}"]
    if stage == "sft":
        argv.append("--config.sft.eval_prompts=0")
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def state_figures(workdir: str) -> tuple[int, int]:
    """Parameters trained, and the train state's bytes, from the run's own model_config.json."""
    fields = json.loads(open(os.path.join(workdir, "model_config.json")).read())
    kind = fields.pop("kind")
    fields.pop("lora_base", None)
    config = LlamaConfig.from_dict(fields)
    abstract = nnx.eval_shape(lambda: TRAINED_KINDS[kind](config, rngs=nnx.Rngs(0)))
    _, trained, frozen = split_model(abstract, config)
    trained_count = sum(variable.size for _, variable in nnx.to_flat_state(trained))
    frozen_bytes = sum(variable.size * stored_bits(variable.dtype) / 8 for _, variable in nnx.to_flat_state(frozen))
    return trained_count, 16 * trained_count + frozen_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["0", "8", "16", "8:int4"],
                        help="RANK (0: every weight trains) or RANK:BASE_DTYPE, one row each")
    parser.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=list(STAGES))
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=16, help="PPO's and GRPO's")
    parser.add_argument("--dir", default="/tmp/lora_bench")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    print("| stage | trained | parameters trained | train state | s / step | held-out result | wall |")
    print("|---|---|---|---|---|---|---|")
    steps = {"sft": args.sft_steps, "dpo": args.dpo_steps, "ppo": args.iterations, "grpo": args.iterations}
    for stage in args.stages:
        for setting in args.runs:
            rank, _, base_dtype = setting.partition(":")
            rank = int(rank)
            workdir = os.path.join(args.dir, f"{stage}_{setting.replace(':', '_')}")
            wall = run(stage, rank, base_dtype, steps[stage], workdir)
            if stage in ON_POLICY:
                workdir = os.path.join(workdir, "train")
            records = read_metrics(workdir)
            step_times = [record["step_time_s"] for record in records if "step_time_s" in record]
            figure_key, figure_name = STAGES[stage][2], STAGES[stage][3]
            held_out = [record[figure_key] for record in records if figure_key in record]
            trained, state_bytes = state_figures(workdir)
            label = "every weight" if not rank else f"LoRA rank {rank}" + (f", {base_dtype} base" if base_dtype else "")
            print(f"| {stage} | {label} | {trained:,} | {state_bytes / 2**20:.1f} MiB | "
                  f"{statistics.median(step_times):.3f} | {figure_name} {held_out[0]:.3f} → {held_out[-1]:.3f} | "
                  f"{wall:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
