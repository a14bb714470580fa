"""Where an on-policy iteration's time goes: sampling the rollout, scoring it (reward models,
reference and policy log-probs, values) and training on it, from the metrics runs have logged.

Every iteration of `ppo`, `grpo`, `rloo` and `reinforce_pp` logs `rollout_s`, `scoring_s` and, from
the second on, `train_s` (the optimizer steps since the rollout before, evaluations and checkpoints
included). The table gives their means over the iterations that have all three, their shares of
the sum, and the sampling rate; the first iteration, which compiles, is left out.

    python benchmarks/on_policy_shares.py runs/ppo/train [LABEL=]WORKDIR ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing the package

from llama2_jax.metrics import read_metrics  # noqa: E402

PHASES = ("rollout_s", "scoring_s", "train_s")


def shares(workdir: str) -> dict[str, float]:
    iterations = [record for record in read_metrics(workdir) if all(phase in record for phase in PHASES)]
    if not iterations:
        raise SystemExit(f"{workdir}/metrics.jsonl holds no iteration with {', '.join(PHASES)}: give the train/ "
                         "directory of an on-policy run of two iterations or more")
    means = {phase: statistics.mean(record[phase] for record in iterations) for phase in PHASES}
    total = sum(means.values())
    return {"iterations": len(iterations), **means, **{f"{phase}_share": means[phase] / total for phase in PHASES},
            "tokens_per_s": statistics.mean(record["rollout_tokens_per_s"] for record in iterations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="[LABEL=]WORKDIR: a run's training workdir (WORKDIR/train of a stage)")
    args = parser.parse_args()
    print("| run | iterations | rollout | scoring | training | rollout tokens/s |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        label, _, workdir = run.rpartition("=")
        values = shares(workdir)
        cells = [f"{values[phase]:.2f} s ({values[phase + '_share']:.0%})" for phase in PHASES]
        print(f"| {label or workdir} | {values['iterations']} | {' | '.join(cells)} | {values['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
