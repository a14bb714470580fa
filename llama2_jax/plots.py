"""Figures written into a workdir as PNG files (matplotlib, drawn off-screen).

    draw_run("runs/tiny")   # the paths written: loss.png, learning_rate.png, throughput.png, ...
    histograms(path, {"chosen": [...], "rejected": [...]}, title=..., xlabel=...)

`draw_run` reads a run's `metrics.jsonl` and draws only what it holds, beside the TensorBoard logs:

    loss.png              training loss and held-out loss against step
    learning_rate.png     the schedule as it was applied
    throughput.png        training tokens/s (all devices)
    eval_metrics.png      every other held-out scalar: task accuracies, a reward model's accuracy by
                          rating level and safety bin and its recall of unsafe answers (one panel),
                          scores and margins (another)
    score_histogram.png   a reward model's last held-out σ(score) histograms, chosen against rejected
    best_of_k.png         rejection sampling's Figure 7: per round, the mean over prompts of the best
                          and the median reward among the first k samples, against k

The stage runner draws them when a run ends, interrupted or not; `python -m llama2_jax plot WORKDIR`
draws them again. Figures are matplotlib `Figure` objects rather than pyplot's, so drawing never
switches the backend of a notebook that shows its own plots.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llama2_jax import storage
from llama2_jax.errors import one_line
from llama2_jax.metrics import HISTOGRAM_RANGE, read_metrics

SCORE_HISTOGRAM_FILE = "score_histogram.png"
BEST_OF_K_FILE = "best_of_k.png"
BEST_OF_K_METRIC = re.compile(r"best_of_(\d+)_(max|median)")
# file: (title, y-axis label, {metric: legend label}), drawn when any of its metrics was logged.
LINE_FIGURES = {
    "loss.png": ("loss", "loss", {"loss": "training", "eval_loss": "held-out"}),
    "learning_rate.png": ("learning rate", "learning rate", {"learning_rate": "learning rate"}),
    "throughput.png": ("training throughput", "tokens/s (all devices)", {"tokens_per_s": "tokens/s"}),
}
EVAL_METRICS_FILE = "eval_metrics.png"
# Held-out metrics that are shares of examples (0 to 1) share a panel: their names contain one of these.
SHARE_WORDS = ("accuracy", "recall")

Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)


def draw_run(workdir: str | os.PathLike) -> list[str]:
    """Draw the figures of the run in `workdir` from its metrics.jsonl; the paths written, in the
    order of the module docstring (in a bucket when the workdir is one). A workdir without
    metrics.jsonl is an error naming the fix."""
    workdir = storage.as_path(workdir)
    records = run_records(workdir)
    series = scalar_series(records)
    written = []
    for name, (title, ylabel, labels) in LINE_FIGURES.items():
        lines = {label: series[metric] for metric, label in labels.items() if metric in series}
        if lines:
            written.append(_draw_panels(workdir / name, [(title, ylabel, lines)]))
    panels = held_out_panels(series)
    if panels:
        written.append(_draw_panels(workdir / EVAL_METRICS_FILE, panels))
    histogram_record = last_score_histograms(records)
    if histogram_record is not None:
        written.append(score_histograms(workdir / SCORE_HISTOGRAM_FILE, histogram_record,
                                        dataset=_dataset_name(workdir)))
    if any(BEST_OF_K_METRIC.fullmatch(name) for record in records for name in record):
        written.append(best_of_k(workdir / BEST_OF_K_FILE, records))
    return written


# ppo.png: one panel per group of PPO's metrics (llama2_jax/stages/ppo.py), each line when logged.
PPO_FILE = "ppo.png"
PPO_PANELS = (
    ("reward (rollouts; held-out: eval_)", "mean score", ("reward_combined", "reward_helpfulness", "reward_safety",
                                                          "eval_reward_combined")),
    ("KL to the reference, per answer", "nats", ("kl_reference", "kl_reference_k3", "eval_kl_reference")),
    ("losses", "per answer token", ("policy_loss", "value_loss")),
    ("the update", "share / nats", ("clip_fraction", "value_clip_fraction", "approx_kl", "entropy",
                                    "safety_share", "eos_rate")),
    ("answers", "tokens", ("answer_length", "eval_answer_length")),
    ("time per iteration", "seconds", ("rollout_s", "scoring_s", "train_s")),
)


def ppo_figure(workdir: str | os.PathLike) -> str:
    """PPO's metrics by step (PPO_PANELS) as ppo.png in `workdir`, the run's training workdir."""
    series = scalar_series(run_records(workdir))
    panels = [(title, ylabel, {name: series[name] for name in names if name in series})
              for title, ylabel, names in PPO_PANELS]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        raise ValueError(f"{workdir}/metrics.jsonl holds no PPO metrics to draw")
    return _draw_panels(storage.as_path(workdir) / PPO_FILE, panels)


def run_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = storage.as_path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist, so there is nothing to draw; give the --workdir of a "
                                "train, sft, reward or rejection run (they log their metrics there)")
    return read_metrics(workdir)


def scalar_series(records: Sequence[Mapping[str, Any]]) -> Series:
    """Every scalar metric as (steps, values). A value whose `<name>_weight` is 0 was measured on
    nothing (a rating level absent from the held-out pairs, say) and is left out."""
    series: Series = {}
    for record in records:
        for name, value in record.items():
            if name == "step" or not isinstance(value, (int, float)) or record.get(f"{name}_weight", 1) == 0:
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return series


def held_out_panels(series: Series) -> list[tuple[str, str, Series]]:
    """The held-out scalars other than the loss and the counts behind them: shares in one panel,
    the rest (scores, margins) in another."""
    metrics = {name: values for name, values in series.items()
               if name.startswith("eval_") and name != "eval_loss" and not name.endswith("weight")}
    shares = {name: values for name, values in metrics.items() if any(word in name for word in SHARE_WORDS)}
    others = {name: values for name, values in metrics.items() if name not in shares}
    panels = []
    if shares:
        panels.append(("held-out accuracy", "share of examples", _without_prefix(shares)))
    if others:
        panels.append(("other held-out metrics", "value", _without_prefix(others)))
    return panels


def last_score_histograms(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last record holding a reward model's held-out score histograms, if any."""
    for record in reversed(records):
        if "eval_chosen_score_histogram" in record and "eval_rejected_score_histogram" in record:
            return dict(record)
    return None


def score_histograms(path: str | os.PathLike, record: Mapping[str, Any], *, dataset: str = "") -> str:
    """A reward model's held-out σ(score) histograms of chosen and rejected answers, from one
    metrics record; the path written."""
    amounts = {side: record[f"eval_{side}_score_histogram"] for side in ("chosen", "rejected")}
    pairs = f"held-out pairs of {dataset}" if dataset else "held-out pairs"
    histograms(path, amounts, title=f"{pairs} at step {record['step']}", xlabel="score σ(r)",
               ylabel="share of pairs")
    return os.fspath(path)


def best_of_k(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> str:
    """Rejection sampling's curves, a pair per round (`step`): the mean over prompts of the best
    reward among the first k samples (solid) and of their median (dashed), against k; the path written."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axis = figure.subplots()
    for record in records:
        curves: dict[str, dict[int, float]] = {"max": {}, "median": {}}
        for name, value in record.items():
            if match := BEST_OF_K_METRIC.fullmatch(name):
                curves[match.group(2)][int(match.group(1))] = value
        if not curves["max"]:
            continue
        ks = sorted(curves["max"])
        line, = axis.plot(ks, [curves["max"][k] for k in ks], marker="o", label=f"round {record['step']}: best of k")
        axis.plot(ks, [curves["median"][k] for k in ks], marker="o", linestyle="--", color=line.get_color(),
                  label=f"round {record['step']}: median of k")
    axis.set_xscale("log", base=2)
    ks = sorted({int(match.group(1)) for record in records for name in record
                 if (match := BEST_OF_K_METRIC.fullmatch(name))})
    axis.set_xticks(ks, labels=[str(k) for k in ks])
    axis.set(title="reward of the best and the median of k samples, mean over prompts", xlabel="k (samples per prompt)",
             ylabel="reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    save_figure(figure, path)
    return os.fspath(path)


def histograms(path: str | os.PathLike, amounts: Mapping[str, Sequence[float]], *, title: str,
               xlabel: str, ylabel: str = "share") -> None:
    """Overlaid histograms, one per label, each the amounts in equal bins over HISTOGRAM_RANGE (as
    the metrics writer logs them)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axis = figure.subplots()
    for label, values in amounts.items():
        edges = np.linspace(*HISTOGRAM_RANGE, len(values) + 1)
        axis.stairs(values, edges, label=label, fill=True, alpha=0.45)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=HISTOGRAM_RANGE)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def _draw_panels(path: str | os.PathLike, panels: Sequence[tuple[str, str, Series]]) -> str:
    """One figure of panels stacked over a shared step axis, each (title, y label, lines)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 1.0 + 3.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axis, (title, ylabel, lines) in zip(axes, panels):
        for label, (steps, values) in lines.items():
            # Evaluations are sparse: markers keep a single one visible.
            axis.plot(steps, values, label=label, marker="o" if len(steps) <= 50 else None, markersize=3)
        axis.set(title=title, ylabel=ylabel)
        axis.grid(alpha=0.3)
        if len(lines) > 3:
            axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            axis.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    save_figure(figure, path)
    return os.fspath(path)


def save_figure(figure, path: str | os.PathLike) -> None:
    """The figure as a PNG at `path`, local or in a bucket (drawn in memory, written once)."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    storage.as_path(path).write_bytes(png.getvalue())


def _without_prefix(series: Series) -> Series:
    return {name.removeprefix("eval_"): values for name, values in series.items()}


def _dataset_name(workdir: str | os.PathLike) -> str:
    """The run's data.dataset from its config.json, for a title; empty when unknown."""
    try:
        return str(json.loads((storage.as_path(workdir) / "config.json").read_text())["data"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def draw_figures(workdir: str) -> None:
    """The run's figures beside its TensorBoard logs (llama2_jax/plots.py), from process 0, also
    after an interruption. A figure that cannot be drawn is a warning: the training itself is done."""
    import jax

    if jax.process_index() != 0 or not (storage.as_path(workdir) / "metrics.jsonl").is_file():
        return
    log = logging.getLogger(__name__)
    try:
        written = draw_run(workdir)
    except (OSError, ValueError) as error:
        log.warning("could not draw the run's figures: %s; draw them with `python -m llama2_jax plot %s`",
                    one_line(error), workdir)
        return
    for path in written:
        log.info("drew %s", path)
