"""The one training loop. Pretraining, SFT and reward modelling differ only in their `Task`.

    restore the newest readable checkpoint (any mesh) or initialise
    repeat: next batch -> jitted update step (state donated) -> log / evaluate / checkpoint
    at the end, or on SIGTERM at the next step boundary: checkpoint, wait for it, return

Resuming is exact: the checkpoint holds the train state and the data iterator's position, and the
step is a deterministic function of both, so N steps + restart + N steps equal 2N steps.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax import metrics as metrics_lib
from llama2_jax import sharding
from llama2_jax.checkpoint.manager import CheckpointManager, write_run_files
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.train import optim
from llama2_jax.train.losses import LossFn
from llama2_jax.train.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    param_dict,
    train_state_shardings,
)
from llama2_jax.train.step import Metrics, make_eval_step, make_train_step, normalised_metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """What a training stage brings to the loop.

    `train_batches(mesh)` returns an endless iterator of global batches with get_state()/set_state();
    `eval_batches(mesh)` a fresh finite iterable for one evaluation (None: no evaluation);
    `initial_model(mesh, rules)` the starting model, sharded (None: a random `model_class` from
    `config.train.seed`; fine-tuning passes pretrained weights here). A restored checkpoint wins
    over both.
    """

    model_config: LlamaConfig
    loss_fn: LossFn
    train_batches: Callable[[Mesh], Iterator[dict[str, jax.Array]]]
    eval_batches: Callable[[Mesh], Iterator[dict[str, jax.Array]]] | None = None
    initial_model: Callable[[Mesh, Any], nnx.Module] | None = None
    model_class: type = Llama
    tokenizer_path: str | None = None


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: Any
    metrics: dict[str, float]  # the last logged training metrics
    interrupted: bool  # stopped by SIGTERM before config.train.steps

    def model(self) -> nnx.Module:
        """The trained model (sharded like the train state)."""
        return nnx.merge(self.graphdef, self.state.params)


class _StopSignal:
    """SIGTERM sets a flag; the loop checkpoints and returns at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_batch_layout(train_config, grad_accum_steps: int, mesh: Mesh, rules) -> None:
    batch_shards = sharding.batch_shard_count(mesh, rules)
    batch = train_config.global_batch_size
    if batch % grad_accum_steps or (batch // grad_accum_steps) % batch_shards:
        raise ValueError(
            f"train.global_batch_size {batch} must split into optimizer.grad_accum_steps "
            f"{grad_accum_steps} micro-batches, each divisible by the {batch_shards} batch shards "
            f"of mesh {dict(mesh.shape)}; "
            "change the batch size, the accumulation steps or the mesh"
        )


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> TrainResult:
    """Train `task` for `config.train.steps` optimizer steps in `workdir`, resuming from the newest
    checkpoint there if any. Returns the final state (also saved)."""
    train_config = config.train
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(tuple(rule) for rule in config.rules)
    grad_accum_steps = config.optimizer.grad_accum_steps
    check_batch_layout(train_config, grad_accum_steps, mesh, rules)

    optimizer, schedule = optim.make_optimizer(config.optimizer, train_config.steps)
    graphdef, abstract_state = sharding.abstract_model(task.model_config, task.model_class)
    sharding.check_platform(task.model_config, mesh)
    sharding.check_fits_mesh(abstract_state, mesh, rules)
    shardings = train_state_shardings(abstract_state, optimizer, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding.batch_sharding(mesh, rules)

    checkpoints = CheckpointManager(workdir, keep=train_config.keep_checkpoints)
    train_batches = task.train_batches(mesh)
    if checkpoints.latest_step() is not None:
        target = abstract_train_state(abstract_state, optimizer, shardings)
        start_step, state = checkpoints.restore(target, train_batches)
        log.info("resumed from step %d in %s", start_step, checkpoints.directory)
    else:
        start_step = 0
        model = (task.initial_model or _random_model(task, train_config.seed))(mesh, rules)
        state = init_train_state(param_dict(model)[1], optimizer, shardings)
        del model
    write_run_files(
        workdir, config.to_dict(), task.model_config.to_dict(), task.tokenizer_path
    )

    with sharding.logical_context(mesh, rules):
        train_step = jax.jit(
            make_train_step(graphdef, task.loss_fn, optimizer, schedule, grad_accum_steps),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        eval_step = jax.jit(
            make_eval_step(graphdef, task.loss_fn),
            in_shardings=(shardings.params, batch_sharding),
            out_shardings=replicated,
        )
        run = _Run(config, workdir, task, mesh, checkpoints, start_step)
        try:
            state, interrupted = run.loop(state, train_step, eval_step, train_batches)
        finally:
            run.close()
    return TrainResult(state, graphdef, mesh, rules, run.last_metrics, interrupted)


def _random_model(task: Task, seed: int) -> Callable[[Mesh, Any], nnx.Module]:
    def create(mesh: Mesh, rules: Any) -> nnx.Module:
        return sharding.create_model(task.model_config, mesh, rules, seed, task.model_class)

    return create


class _Run:
    """The stepping, logging, evaluation and checkpoint cadence of one `train` call."""

    def __init__(self, config, workdir, task: Task, mesh: Mesh, checkpoints, start_step: int):
        self.config, self.task, self.mesh, self.checkpoints = config, task, mesh, checkpoints
        self.train_config = config.train
        self.start_step = start_step
        self.writer = metrics_lib.MetricsWriter(workdir, resume_after_step=start_step)
        self.progress = metrics_lib.Progress(self.train_config.steps, start_step)
        self.flops_per_token = metrics_lib.flops_per_token(task.model_config, self.train_config.seq_len)
        self.peak_flops = metrics_lib.peak_flops_per_device(override=self.train_config.peak_flops)
        self.tokens_per_step = self.train_config.global_batch_size * self.train_config.seq_len
        self.last_metrics: dict[str, float] = {}

    def loop(self, state: TrainState, train_step, eval_step, train_batches) -> tuple[TrainState, bool]:
        cfg = self.train_config
        step = self.start_step
        saved_step = step if self.checkpoints.latest_step() == step else None
        window_start, window_steps = None, 0
        first_step_start = time.perf_counter()
        interrupted = False
        with _StopSignal() as stop:
            while step < cfg.steps:
                if self._should_stop(stop, step):
                    interrupted = True
                    break
                state, step_metrics = train_step(state, next(train_batches))
                step += 1
                window_steps += 1
                if window_start is None:
                    # The first step compiles; throughput is measured from the end of it.
                    jax.block_until_ready(step_metrics)
                    seconds = time.perf_counter() - first_step_start
                    self.progress.log(f"step {step}: compiled and ran the first step in {seconds:.1f} s")
                    window_start, window_steps = time.perf_counter(), 0
                if step % cfg.log_every == 0 or step == cfg.steps:
                    jax.block_until_ready(step_metrics)
                    elapsed = time.perf_counter() - window_start
                    self._log(step, step_metrics, elapsed, window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                evaluation_due = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
                if evaluation_due and self.task.eval_batches:
                    self._evaluate(step, state, eval_step)
                if step % cfg.checkpoint_every == 0:
                    self._save(step, state, train_batches)
                    saved_step = step
                self.progress.update(step, self.last_metrics.get("loss"))
            if saved_step != step:
                self._save(step, state, train_batches)
        self.checkpoints.wait()
        return state, interrupted

    def _should_stop(self, stop: _StopSignal, step: int) -> bool:
        if jax.process_count() == 1:
            return stop.requested
        # Every process must stop at the same step; agreeing costs a host sync, so only at logs.
        if step % self.train_config.log_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array(stop.requested))))

    def _log(self, step: int, step_metrics: Metrics, elapsed: float, steps: int) -> None:
        values = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
        values.pop("weight", None)
        if steps > 0 and elapsed > 0:
            values["step_time_s"] = elapsed / steps
            values.update(
                metrics_lib.throughput(
                    self.tokens_per_step * steps, elapsed, self.flops_per_token, self.peak_flops
                )
            )
        values.update(metrics_lib.device_memory_gib())
        self.last_metrics = values
        self.writer.write(step, values)
        self.progress.log(_format(step, self.train_config.steps, values))

    def _evaluate(self, step: int, state: TrainState, eval_step) -> None:
        totals = None
        batches = self.task.eval_batches(self.mesh)
        for _, batch in zip(range(self.train_config.eval_steps), batches):
            sums = eval_step(state.params, batch)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if totals is None:
            log.warning("evaluation at step %d found no batches", step)
            return
        values = {k: float(v) for k, v in jax.device_get(normalised_metrics(totals)).items()}
        values["tokens"] = values.pop("weight")
        self.writer.write(step, values, prefix="eval_")
        self.progress.log(_format(step, self.train_config.steps, values, prefix="eval "))

    def _save(self, step: int, state: TrainState, train_batches) -> None:
        self.checkpoints.save(step, state, train_batches, self.config.to_dict(), force=True)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.checkpoints.close()


def _format(step: int, total: int, values: dict[str, float], prefix: str = "") -> str:
    shown = ["loss", "grad_norm", "learning_rate", "tokens_per_s", "tflops_per_device", "mfu",
             "step_time_s", "peak_memory_gib", "tokens"]
    parts = [f"{name} {values[name]:.4g}" for name in shown if name in values]
    return f"{prefix}step {step}/{total}: " + ", ".join(parts)
