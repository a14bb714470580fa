"""`python -m llama2_jax plot`: draw a run's figures again from its metrics.jsonl.

    python -m llama2_jax plot runs/tiny

Writes, beside the run's TensorBoard logs, the PNG files every stage draws when it ends
(llama2_jax/plots.py): `loss.png`, `learning_rate.png`, `throughput.png`, `eval_metrics.png` when
the run evaluated anything beyond the loss, and a reward model's `score_histogram.png`. Only
figures for metrics the run logged are drawn. Works on a run still in progress or interrupted.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama2_jax import plots
from llama2_jax.cli import ArgumentParser, reports_errors


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax plot", description=__doc__)
    parser.add_argument("workdir", help="the --workdir of a train, sft, reward or rejection run")
    args = parser.parse_args(argv)
    written = plots.draw_run(args.workdir)
    if not written:
        raise ValueError(f"{args.workdir}/metrics.jsonl holds no metrics yet; draw again once the run has "
                         "logged a step (train.log_every) or an evaluation")
    for path in written:
        print(path)
    return 0
