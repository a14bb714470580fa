"""The one training loop. Pretraining, SFT, the reward models and PPO differ only in their `Task`.

    restore the newest readable checkpoint (any mesh) or initialise
    repeat: next batch -> jitted update step (state donated) -> log / evaluate / checkpoint
            (an on-policy task makes the batch from the current model: PPO's rollouts)
    at the end, or on SIGTERM or Ctrl-C at a step all processes agree on (stopping.py): checkpoint,
    wait for it, return

Resuming is exact: the checkpoint holds the train state and the data iterator's position, and the
step is a deterministic function of both, so N steps + restart + N steps equal 2N steps. A resumed
run keeps the learning-rate schedule it started with unless `optimizer.decay_steps` says otherwise,
so raising `train.steps` extends a run rather than bending its schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import metrics as metrics_lib
from llama2_jax import sharding, storage
from llama2_jax.checkpoint.manager import CheckpointManager, write_run_files
from llama2_jax.train import lora_runs
from llama2_jax.train.state import TrainState, init_train_state, split_params
from llama2_jax.train.step import Metrics, Steps, build_steps, normalised_metrics
from llama2_jax.train.stopping import StopRequests
from llama2_jax.train.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: Any
    metrics: dict[str, float | list[float]]  # the last logged training metrics (lists: histograms)
    eval_metrics: dict[str, float | list[float]]  # the last evaluation's
    interrupted: bool  # stopped by SIGTERM or Ctrl-C before config.train.steps
    early_stopped: str | None = None  # why the task's early_stop ended the run, if it did
    frozen: Any = dataclasses.field(default_factory=dict)  # the parameters the run did not train

    def model(self) -> nnx.Module:
        """The trained model (sharded like the train state), adapters and all."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> TrainResult:
    """Train `task` for `config.train.steps` optimizer steps in `workdir`, resuming from the newest
    checkpoint there if any. Returns the final state (also saved)."""
    storage.check_filesystem(workdir)  # before anything is written, a bucket nothing here can reach
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(tuple(rule) for rule in config.rules)
    checkpoints = CheckpointManager(workdir, keep=config.train.keep_checkpoints)
    latest = checkpoints.latest_step()
    steps = build_steps(task, config, mesh, rules, schedule_steps=_schedule_steps(config, checkpoints, latest))
    train_batches = task.train_batches(mesh, rules)
    initial_model = task.initial_model or _random_model(task, config.train.seed)
    if latest is not None:
        start_step, state = checkpoints.restore(steps.abstract_state(), train_batches)
        log.info("resumed from step %d in %s", start_step, checkpoints.directory)
        # The frozen base is no part of a checkpoint: it is read again from where the run started.
        frozen = _frozen_params(initial_model(mesh, rules), steps) if nnx.to_flat_state(steps.abstract_frozen) else {}
    else:
        start_step = 0
        _, trained, frozen = split_params(initial_model(mesh, rules))
        state = init_train_state(_cast_to(trained, steps.abstract_model, steps.shardings.params), steps.optimizer,
                                 steps.shardings)
        frozen = _cast_to(frozen, steps.abstract_frozen, steps.frozen_shardings)
    base = lora_runs.base_record(config, frozen, workdir, resuming=latest is not None) if frozen else None
    write_run_files(workdir, config.to_dict(), task.model_config.to_dict(), task.tokenizer_path, task.model_kind,
                    base=base)

    run = _Run(config, workdir, task, steps, checkpoints, start_step, frozen)
    try:
        with steps.context():
            state, interrupted = run.loop(state, train_batches)
    finally:
        run.close()
    return TrainResult(state, steps.graphdef, mesh, rules, run.last_metrics, run.last_eval_metrics, interrupted,
                       run.early_stopped, frozen)


def _schedule_steps(config: ml_collections.ConfigDict, checkpoints: CheckpointManager, latest: int | None) -> int:
    """The schedule's length: the config's, or, when a run is resumed without `decay_steps`, the
    length the run started with (raising `train.steps` then extends the run on its schedule)."""
    requested = config.optimizer.decay_steps or config.train.steps
    if latest is None or config.optimizer.decay_steps:
        return requested
    saved = checkpoints.saved_config(latest)
    started_with = saved["optimizer"]["decay_steps"] or saved["train"]["steps"]
    if started_with != requested:
        log.warning("train.steps is now %d, but the run's schedule was %d steps long: keeping it (the learning "
                    "rate stays at its end value past step %d); set optimizer.decay_steps to change it",
                    config.train.steps, started_with, started_with)
    return started_with


def _random_model(task: Task, seed: int) -> Callable[[Mesh, Any], nnx.Module]:
    def create(mesh: Mesh, rules: Any) -> nnx.Module:
        return sharding.create_model(task.model_config, mesh, rules, seed, task.model_class)

    return create


def _cast_to(params: Any, abstract: nnx.State, shardings: Any) -> Any:
    """Parameters in the dtypes and layout of `abstract` and `shardings` (a no-op when they already
    are: a pretrained model in bfloat16 becomes float32 master weights, sharded by the run's rules)."""
    dtypes = jax.tree.map(lambda variable: variable.dtype, nnx.to_pure_dict(abstract))
    cast = jax.jit(lambda tree: jax.tree.map(lambda leaf, dtype: leaf.astype(dtype), tree, dtypes),
                   out_shardings=shardings)
    return cast(params)


def _frozen_params(model: nnx.Module, steps: Steps) -> Any:
    """The frozen part of a freshly started model, as the step takes it."""
    return _cast_to(split_params(model)[2], steps.abstract_frozen, steps.frozen_shardings)


class _Run:
    """The stepping, logging, evaluation and checkpoint cadence of one `train` call."""

    def __init__(self, config, workdir, task: Task, steps: Steps, checkpoints, start_step: int, frozen: Any):
        self.config, self.task, self.steps, self.checkpoints = config, task, steps, checkpoints
        self.frozen = frozen
        self.train_config = config.train
        self.start_step = start_step
        self.writer = metrics_lib.MetricsWriter(workdir, resume_after_step=start_step)
        self.progress = metrics_lib.Progress(self.train_config.steps, start_step, unit="step")
        self.flops_per_token = steps.flops_per_token
        self.peak_flops = metrics_lib.peak_flops_per_device(override=self.train_config.peak_flops)
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}
        self.batch_metrics: dict[str, float] = {}  # what an on-policy task made since the last log
        self.making_batches_s = 0.0  # time an on-policy task took to make them, not the steps'
        self.early_stopped: str | None = None

    def loop(self, state: TrainState, train_batches) -> tuple[TrainState, bool]:
        cfg = self.train_config
        step = self.start_step
        saved_step = step if self.checkpoints.latest_step() == step else None
        window_start, window_steps = None, 0
        first_step_start = time.perf_counter()
        interrupted = False
        evaluates = self.task.eval_batches or self.task.model_evals
        if step == 0 and cfg.eval_every and evaluates:
            self._evaluate(step, state)  # where the run starts from: the baseline later evaluations beat
        previous_metrics = None
        with StopRequests() as stop:
            while step < cfg.steps:
                if stop.should_stop(step):
                    interrupted = True
                    break
                state, step_metrics = self.steps.train_step(state, self._next_batch(state, train_batches), self.frozen)
                # At most two steps in flight: the devices still never wait for the host, and a stop
                # is a step or two of device time away, not as many steps as the host had run ahead.
                jax.block_until_ready(previous_metrics)
                previous_metrics = step_metrics
                step += 1
                window_steps += 1
                if window_start is None:
                    # The first step compiles; throughput is measured from the end of it.
                    jax.block_until_ready(step_metrics)
                    seconds = time.perf_counter() - first_step_start
                    self.progress.log(f"step {step}: compiled and ran the first step in {seconds:.1f} s")
                    self.progress.restart_clock(step)
                    window_start, window_steps, self.making_batches_s = time.perf_counter(), 0, 0.0
                if step % cfg.log_every == 0 or step == cfg.steps:
                    jax.block_until_ready(step_metrics)
                    elapsed = time.perf_counter() - window_start
                    self._log(step, step_metrics, elapsed, window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                evaluation_due = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
                if evaluation_due and evaluates:
                    self._evaluate(step, state)
                if step % cfg.checkpoint_every == 0 or self.early_stopped:
                    self._check_finite(step, step_metrics["loss"])
                    self._save(step, state, train_batches)
                    saved_step = step
                self.progress.update(step, self.last_metrics.get("loss"))
                if self.early_stopped:
                    break
            if saved_step != step:
                self._save(step, state, train_batches)
        self.checkpoints.wait()
        return state, interrupted

    def _check_finite(self, step: int, loss) -> None:
        """A NaN or infinite loss ends the run before the state that gave it is saved."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss} at step {step}; stopping without saving it (the workdir's newest checkpoint, "
                f"step {self.checkpoints.latest_step()}, is intact): lower optimizer.peak_lr or check the data, then "
                "rerun to resume from that checkpoint")

    def _next_batch(self, state: TrainState, train_batches):
        if not self.task.on_policy:
            return next(train_batches)
        start = time.perf_counter()
        batch, made = train_batches.next_batch(self.steps.model(state.params, self.frozen))
        self.batch_metrics.update(made)
        self.making_batches_s += time.perf_counter() - start
        return batch

    def _log(self, step: int, step_metrics: Metrics, elapsed: float, steps: int) -> None:
        values = metrics_lib.host_values(step_metrics)
        values.pop("weight", None)
        self._check_finite(step, values["loss"])
        values.update(self.batch_metrics)
        self.batch_metrics = {}
        elapsed, self.making_batches_s = elapsed - self.making_batches_s, 0.0
        if steps > 0 and elapsed > 0:
            values["step_time_s"] = elapsed / steps
            values.update(metrics_lib.throughput(
                self.steps.tokens_per_step * steps, elapsed, self.flops_per_token, self.peak_flops))
        values.update(metrics_lib.device_memory_gib())
        self.last_metrics = values
        self.writer.write(step, values)
        self.progress.log(metrics_lib.format_line(f"step {step}/{self.train_config.steps}", values,
                                                  eta=self.progress.eta(step)))

    def _evaluate(self, step: int, state: TrainState) -> None:
        totals = None
        batches = self.task.eval_batches(self.steps.mesh, self.steps.rules) if self.task.eval_batches else ()
        limit = self.train_config.eval_steps or None
        for index, batch in enumerate(batches):
            if limit is not None and index >= limit:
                break
            # One evaluation step at a time: independent programs with collectives that run at once
            # can deadlock on a CPU host's simulated devices, which share one small thread pool.
            sums = jax.block_until_ready(self.steps.eval_step(state.params, batch, self.frozen))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if totals is None and self.task.eval_batches:
            log.warning("evaluation at step %d found no batches", step)
            return
        values = metrics_lib.host_values(normalised_metrics(totals)) if totals is not None else {}
        if self.task.model_evals:
            model = self.steps.model(state.params, self.frozen)
            values.update(self.task.model_evals(model, self.steps.mesh, self.steps.rules))
        self.last_eval_metrics = values
        self.writer.write(step, values, prefix="eval_")
        self.progress.log(metrics_lib.format_line(f"eval at step {step}", values))
        if self.task.early_stop and step > 0:
            self.early_stopped = self.task.early_stop(values)
            if self.early_stopped:
                self.progress.log(f"step {step}: stopping early: {self.early_stopped}")

    def _save(self, step: int, state: TrainState, train_batches) -> None:
        self.checkpoints.save(step, state, train_batches, self.config.to_dict(), force=True)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.checkpoints.close()
