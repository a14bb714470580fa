"""Training throughput accounting (FLOPs, MFU), metric writers and a terminal progress line.

FLOPs per token: `6 × (matmul parameters, output head included, input embedding excluded)
+ 6 × layers × seq_len × dim`, the second term being causal attention's score and value matmuls,
forward and backward (docs/recipe.md). MFU divides the achieved FLOP rate by the chip's dense bf16
peak.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np
from etils import epath

from llama2_jax import storage

# Vector-valued metrics are histograms over equal bins of this range (MetricsWriter).
HISTOGRAM_RANGE = (0.0, 1.0)
# metrics.jsonl in a bucket is rewritten whole, so not on every logged step of a fast run.
BUCKET_UPLOAD_SECONDS = 30.0
# Off a terminal, how often a batch loop (scoring, sampling, likelihoods) prints how far it is.
PROGRESS_LINE_SECONDS = 10.0
# Dense bf16 peak per chip, FLOP/s, matched against `jax.Device.device_kind`.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def matmul_parameter_count(model_config: Any) -> int:
    """Parameters that take part in a matmul per token: every layer's attention and MLP weights
    and the output head; the input embedding is a lookup and norms are elementwise."""
    dim, head_dim = model_config.dim, model_config.head_dim
    attention = dim * head_dim * (2 * model_config.n_heads + 2 * model_config.n_kv_heads)
    mlp = 3 * dim * model_config.ffn_dim
    return model_config.n_layers * (attention + mlp) + dim * model_config.vocab_size


def flops_per_token(model_config: Any, seq_len: int, matmul_parameters: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`; by default the
    language model's matmul parameters (a reward model's head is one column, not the vocabulary)."""
    attention = 6 * model_config.n_layers * seq_len * model_config.dim
    return 6.0 * (matmul_parameters or matmul_parameter_count(model_config)) + attention


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in FLOP/s; `override` (> 0) wins; None when unknown (CPU)."""
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for prefix, peak in PEAK_FLOPS_BY_DEVICE_KIND:
        if prefix.lower() in kind.lower():
            return peak
    return None


def device_memory_gib() -> dict[str, float]:
    """Current and peak bytes in use on the first local device, in GiB (empty on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    gib = float(2**30)
    found = {}
    if "bytes_in_use" in stats:
        found["memory_gib"] = stats["bytes_in_use"] / gib
    if "peak_bytes_in_use" in stats:
        found["peak_memory_gib"] = stats["peak_bytes_in_use"] / gib
    return found


def throughput(
    tokens: float, seconds: float, flops_per_token_value: float, peak_flops: float | None
) -> dict[str, float]:
    """tokens/s (all devices), TFLOP/s per device and MFU for `tokens` processed in `seconds`."""
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token_value / jax.device_count()
    rates = {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12}
    if peak_flops:
        rates["mfu"] = flops_per_device / peak_flops
    return rates


def host_values(values: Mapping[str, Any]) -> dict[str, float | list[float]]:
    """Metrics as Python numbers: scalars as floats, vectors (histograms) as lists of floats."""
    values = jax.device_get(dict(values))
    return {name: float(value) if np.ndim(value) == 0 else [float(x) for x in np.ravel(value)]
            for name, value in values.items()}


class MetricsWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl` and writes the same
    values as TensorBoard events under `workdir/tensorboard`. Only process 0 writes. The workdir
    may be a bucket (llama2_jax/storage.py): there both files are rewritten whole, metrics.jsonl at
    most every BUCKET_UPLOAD_SECONDS and the events every TensorBoard flush (120 s), and both on close.

    A vector value is a histogram: its entries are the amounts in equal bins over HISTOGRAM_RANGE
    (scores as probabilities), shown by TensorBoard as a histogram."""

    def __init__(self, workdir: str, *, resume_after_step: int | None = None):
        self._enabled = jax.process_index() == 0
        directory = storage.as_path(workdir)
        self.jsonl_path = directory / "metrics.jsonl"
        if not self._enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        # Lines beyond the restored checkpoint belong to steps that will be run again.
        kept = _lines_up_to_step(self.jsonl_path, resume_after_step or 0)
        self._tensorboard = _tensorboard_writer(directory / "tensorboard")
        self._jsonl = storage.open_for_appending(self.jsonl_path, kept, seconds_between_uploads=BUCKET_UPLOAD_SECONDS)

    def write(self, step: int, values: Mapping[str, float | list[float]], prefix: str = "") -> None:
        if not self._enabled:
            return
        values = {f"{prefix}{name}": value for name, value in host_values(values).items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, list):
                self._add_histogram(name, np.asarray(value), step)
            else:
                self._tensorboard.add_scalar(name, value, step)

    def _add_histogram(self, name: str, amounts: np.ndarray, step: int) -> None:
        if not amounts.sum() > 0:
            return
        edges = np.linspace(*HISTOGRAM_RANGE, len(amounts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        filled = np.flatnonzero(amounts)
        self._tensorboard.add_histogram_raw(
            name, min=edges[filled[0]], max=edges[filled[-1] + 1], num=amounts.sum(),
            sum=float(amounts @ centres), sum_squares=float(amounts @ centres**2),
            bucket_limits=edges[1:], bucket_counts=amounts, global_step=step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _lines_up_to_step(path: epath.Path, last_step: int) -> str:
    if not path.exists():
        return ""
    lines = path.read_text().splitlines(keepends=True)
    return "".join(line for line in lines if line.strip() and json.loads(line)["step"] <= last_step)


def _tensorboard_writer(directory: epath.Path):
    from tensorboardX import SummaryWriter, record_writer

    if storage.is_url(directory):
        # tensorboardX's own gs:// and s3:// writers need google-cloud-storage or boto3; through
        # epath a bucket needs only the filesystem every other file of the run goes through.
        record_writer.register_writer_factory(storage.url_scheme(directory), _BucketEventFiles())
    return SummaryWriter(os.fspath(directory))


class _BucketEventFiles:
    """tensorboardX's writer factory for event files in a bucket."""

    def open(self, path: str) -> storage.BucketFile:
        return storage.BucketFile(epath.Path(path))

    def directory_check(self, path: str) -> None:
        del path  # a bucket has no directories to make


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every logged record in `workdir/metrics.jsonl`, in order."""
    text = (storage.as_path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Metrics shown on a log line, in this order; the rest go to metrics.jsonl and TensorBoard only.
SHOWN = ("loss", "accuracy", "reward", "reward_combined", "kl_reference", "policy_loss", "value_loss", "clip_fraction",
         "grad_norm", "learning_rate", "tokens_per_s", "tflops_per_device", "mfu", "step_time_s", "rollout_s",
         "peak_memory_gib")


def format_line(prefix: str, values: Mapping[str, float], eta: float | None = None) -> str:
    """`prefix: loss 2.31, ..., MFU 41.2 %, eta 3m05s`: the numbers a person reads while training."""
    parts = []
    # Then any task's accuracy (an evaluation's multiple-choice tasks: `eval_<task>_accuracy`).
    for name in [*SHOWN, *sorted(name for name in values if name.endswith("_accuracy") and name not in SHOWN)]:
        if name not in values:
            continue
        if name == "mfu":
            parts.append(f"MFU {100 * values[name]:.1f} %")
        else:
            parts.append(f"{name} {values[name]:.4g}")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return f"{prefix}: " + ", ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """A one-line progress bar with a rate and an ETA on a terminal, with log lines printed above
    it; off a terminal there is no bar and log lines are plain lines. Only process 0 prints.
    Every long loop uses it: training, evaluation, sampling, scoring, data building.

    Off a terminal (a notebook, a log file), a loop that logs nothing of its own passes
    `line_seconds`: the bar's text is then printed as a plain line whenever that long has passed
    since the last one, so a long loop still shows how far it is and a short one prints nothing.
    """

    def __init__(self, total: int, first: int = 0, *, unit: str = "step", stream: TextIO | None = None,
                 line_seconds: float | None = None):
        self._stream = stream or sys.stderr
        self._printing = jax.process_index() == 0
        self._active = self._printing and self._stream.isatty()
        self._total, self._unit = total, unit
        self._line_seconds, self._last_line = line_seconds, time.perf_counter()
        self.restart_clock(first)

    def restart_clock(self, done: int) -> None:
        """Measure the rate from here (after a first step that compiled, say)."""
        self._clock_start, self._clock_done = time.perf_counter(), done

    def eta(self, done: int) -> float | None:
        elapsed = time.perf_counter() - self._clock_start
        if done <= self._clock_done or elapsed <= 0:
            return None
        return (self._total - done) * elapsed / (done - self._clock_done)

    def log(self, line: str) -> None:
        if not self._printing:
            return
        clear = "\r\033[K" if self._active else ""
        self._stream.write(f"{clear}{line}\n")
        self._stream.flush()

    def update(self, done: int, loss: float | None = None) -> None:
        if not self._active:
            self._plain_line(done, loss)
            return
        width = 30
        filled = int(width * done / max(self._total, 1))
        self._stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._status(done, loss)}")
        self._stream.flush()

    def _status(self, done: int, loss: float | None) -> str:
        text = f"{self._unit} {done}/{self._total}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        eta = self.eta(done)
        if eta is not None:
            text += f" eta {format_duration(eta)}"
        return text

    def _plain_line(self, done: int, loss: float | None) -> None:
        if not self._printing or self._line_seconds is None:
            return
        now = time.perf_counter()
        if now - self._last_line >= self._line_seconds:
            self._last_line = now
            self.log(self._status(done, loss))

    def close(self) -> None:
        if self._active:
            self._stream.write("\n")
            self._stream.flush()
