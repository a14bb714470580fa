"""`Task`: what a stage brings to the one training loop — its model, its loss and its batches.

Pretraining, SFT and the reward models are each a Task built by their module in
llama2_jax/stages/; the loop (loop.py), the step builder (step.py), `aot` and `bench` take any
Task. Building one is cheap: data and weights are touched only when the loop calls
`train_batches`, `eval_batches` or `initial_model`, so `aot` can compile a 70B stage on a laptop.
Each of those receives the run's mesh and rules, so batches and weights are laid out exactly as
the train state and the step expect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from llama2_jax.data.batch import BatchSpec
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import TRAINED_KINDS
from llama2_jax.train.losses import LossFn

Batch = dict[str, jax.Array]
Rules = Any  # a rules table: ((logical axis, mesh axes), ...)


@dataclasses.dataclass(frozen=True)
class Task:
    """A stage on the loop.

    `train_batches(mesh, rules)`: an endless iterator of global batches with `get_state()` and
    `set_state()` (the checkpoint saves its position).
    `eval_batches(mesh, rules)`: a fresh finite iterable for one evaluation (None: no evaluation).
    `initial_model(mesh, rules)`: the starting model, sharded by those rules (None: a random model
    of `model_kind` from `config.train.seed`; fine-tuning loads pretrained weights here). A
    checkpoint in the workdir wins over both.
    `model_evals(model, mesh, rules)`: metrics of the whole model at each evaluation, beside the
    loss function's (multiple-choice tasks, say), logged with the `eval_` prefix.
    `early_stop(eval_metrics)`: after each evaluation, a reason to end the run there, or None.

    An `on_policy` task makes its batches from the model being trained (PPO's rollouts): its
    `train_batches` iterator has `next_batch(model) -> (batch, metrics)` in place of `next()`, where
    `metrics` describes what was made for this batch (empty when nothing new was), logged with the
    step's. `peak_lrs` gives parameter subtrees optimizers with learning rates of their own
    (llama2_jax.train.optim.make_optimizer).
    """

    model_config: LlamaConfig
    loss_fn: LossFn
    batch_spec: BatchSpec
    train_batches: Callable[[Mesh, Rules], Iterator[Batch]]
    eval_batches: Callable[[Mesh, Rules], Iterable[Batch]] | None = None
    initial_model: Callable[[Mesh, Rules], nnx.Module] | None = None
    model_evals: Callable[[nnx.Module, Mesh, Rules], dict[str, float]] | None = None
    model_kind: str = "llama"  # a key of llama2_jax.model.llama.TRAINED_KINDS
    tokenizer_path: str | None = None
    early_stop: Callable[[dict[str, float]], str | None] | None = None
    on_policy: bool = False
    peak_lrs: Mapping[str, float] | None = None

    @property
    def model_class(self) -> type:
        return TRAINED_KINDS[self.model_kind]
