"""Figures written into a workdir as PNG files (matplotlib, drawn off-screen).

    histograms(path, {"chosen": [...], "rejected": [...]}, title=..., xlabel=...)

Each function takes plain numbers (what metrics.jsonl holds) and writes one figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from llama2_jax.metrics import HISTOGRAM_RANGE


def histograms(path: str | os.PathLike, amounts: Mapping[str, Sequence[float]], *, title: str,
               xlabel: str, ylabel: str = "share") -> None:
    """Overlaid histograms, one per label, each the amounts in equal bins over HISTOGRAM_RANGE (as
    the metrics writer logs them)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6.4, 4.0))
    for label, values in amounts.items():
        edges = np.linspace(*HISTOGRAM_RANGE, len(values) + 1)
        axis.stairs(values, edges, label=label, fill=True, alpha=0.45)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=HISTOGRAM_RANGE)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
