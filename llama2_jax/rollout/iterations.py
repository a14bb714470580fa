"""An on-policy run's batches, made by the policy being trained: one rollout per iteration, then its
mini-batches.

    sample   `rollouts / samples` prompts answered `samples` times each by the current policy
             (llama2_jax/rollout/sampler.py; the sampler's decoding copy follows the policy)
    score    what the stage's `score` makes of the answers: training rows and the rollout's metrics
    train    the rollout shuffled into `rollouts / mini_batch` mini-batches, each one optimizer step,
             `epochs` times over

`RolloutBatches` is the on-policy iterator the loop asks for each batch (`next_batch(model)`); its
position (iteration and mini-batch) is saved in every checkpoint. Iteration i draws its prompts and
its sampling keys from `train.seed` and i alone, and its rollout is written whole to
`rollouts/iteration_NNNNN.npz` before its first step, so a run stopped in the middle of an iteration
resumes on the very rollout it was training on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import generate
from llama2_jax.length_batches import place_rows
from llama2_jax.rollout.sampler import Answer, Sampler, sampling_seed

KEEP_ROLLOUTS = 2  # rollout files kept: the iteration in training and the one before
METRICS_KEY = "_metrics"  # the rollout's metrics, as JSON, beside its rows in its file


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an iteration's rollout needs from the config."""

    rollouts: int
    mini_batch: int
    epochs: int
    max_new_tokens: int
    temperature: float
    slots: int  # answers decoding together
    score_batch_size: int
    seq_len: int
    seed: int
    eos_id: int
    samples: int = 1  # answers per prompt; rollouts // samples prompts an iteration

    @property
    def steps_per_iteration(self) -> int:
        return self.rollouts // self.mini_batch * self.epochs


def timing_metrics(seconds: dict[str, float], new_tokens: int) -> dict[str, float]:
    """The phases' seconds and the sampling rate."""
    values = {f"{phase}_s": value for phase, value in seconds.items()}
    if seconds.get("rollout"):
        values["rollout_tokens_per_s"] = new_tokens / seconds["rollout"]
    return values


def iteration_prompts(count: int, prompts: int, iteration: int, seed: int) -> np.ndarray:
    """The prompt indices of iteration `iteration`: the next `count` of an endless stream of the
    prompts, shuffled anew for each pass over them."""
    stream = np.arange(iteration * count, (iteration + 1) * count)
    passes = {int(number): np.random.default_rng([seed, int(number)]).permutation(prompts)
              for number in np.unique(stream // prompts)}
    return np.array([passes[int(position // prompts)][position % prompts] for position in stream])


def mini_batch_rows(settings: Settings, iteration: int) -> list[np.ndarray]:
    """The rows of each of an iteration's mini-batches: the rollout shuffled anew for each epoch."""
    rng = np.random.default_rng([settings.seed, iteration, 1])
    order = np.concatenate([rng.permutation(settings.rollouts) for _ in range(settings.epochs)])
    return [order[start:start + settings.mini_batch] for start in range(0, len(order), settings.mini_batch)]


# How a rollout is scored: (trained model, the answers, each answer's index in the prompt list) ->
# (training rows, the rollout's metrics).
ScoreFn = Callable[[nnx.Module, list[Answer], np.ndarray], tuple[dict[str, np.ndarray], dict[str, float]]]


class RolloutBatches:
    """The loop's on-policy iterator (llama2_jax/train/task.py): `next_batch(model)` gives the next
    mini-batch, making the next iteration's rollout from `model` when the last one is used up.

    An iteration answers `rollouts // samples` prompts `samples` times each (one prefill per prompt)
    from `sampler`, which follows `policy_of(model)`, and scores them with `score`."""

    def __init__(self, settings: Settings, prompt_tokens: Sequence[Sequence[int]], sampler: Sampler,
                 policy_of: Callable[[nnx.Module], nnx.Module], score: ScoreFn, directory: epath.Path, mesh: Mesh,
                 rules):
        self.settings, self.prompt_tokens, self.sampler = settings, prompt_tokens, sampler
        self.policy_of, self.score = policy_of, score
        self.directory, self.mesh, self.rules = directory, mesh, rules
        self.iteration, self.position = 0, 0
        self.rows: dict[str, np.ndarray] | None = None
        self.last_rollout_end: float | None = None

    def get_state(self) -> dict:
        return {"iteration": self.iteration, "position": self.position, "seed": self.settings.seed}

    def set_state(self, state: dict) -> None:
        if state["seed"] != self.settings.seed:
            raise ValueError(f"the checkpoint's rollouts were drawn with train.seed {state['seed']}, the config's is "
                             f"{self.settings.seed}; resume with the seed it started with")
        self.iteration, self.position, self.rows = state["iteration"], state["position"], None

    def steps_done(self) -> int:
        """Optimizer steps taken on the rollouts so far."""
        return self.iteration * self.settings.steps_per_iteration + self.position

    def next_batch(self, model: nnx.Module) -> tuple[dict[str, jax.Array], dict[str, float]]:
        made = {}
        if self.position == self.settings.steps_per_iteration:
            self.iteration, self.position, self.rows = self.iteration + 1, 0, None
        if self.rows is None:
            # Mid-iteration after a restart: the rollout trained on before the stop, and its metrics,
            # which the stopped run may not have logged yet.
            self.rows, made = self.read(self.iteration) if self.position > 0 else self.make(model)
        rows = mini_batch_rows(self.settings, self.iteration)[self.position]
        self.position += 1
        return place_rows({name: values[rows] for name, values in self.rows.items()}, self.mesh, self.rules), made

    def make(self, model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """This iteration's rollout from `model`, written to its file; and its metrics."""
        settings = self.settings
        train_seconds = time.perf_counter() - self.last_rollout_end if self.last_rollout_end else None
        indices = iteration_prompts(settings.rollouts // settings.samples, len(self.prompt_tokens), self.iteration,
                                    settings.seed)
        prompts = [self.prompt_tokens[index] for index in indices]
        start = time.perf_counter()
        self.sampler.update(self.policy_of(model))
        answers, _, _ = self.sampler.sample(
            prompts, samples=settings.samples, sampling=generate.SamplingParams(temperature=settings.temperature),
            max_new_tokens=settings.max_new_tokens, eos_id=settings.eos_id, slots=settings.slots,
            seed=sampling_seed(settings.seed, self.iteration))
        sampled = time.perf_counter()
        rows, metrics = self.score(model, answers, indices[[answer.prompt for answer in answers]])
        seconds = {"rollout": sampled - start, "scoring": time.perf_counter() - sampled}
        if train_seconds is not None:
            seconds["train"] = train_seconds
        made = {"iteration": float(self.iteration + 1), **metrics,
                **timing_metrics(seconds, sum(len(answer.tokens) for answer in answers))}
        self.write(self.iteration, rows, made)
        self.last_rollout_end = time.perf_counter()
        return rows, made

    def path(self, iteration: int) -> epath.Path:
        return self.directory / "rollouts" / f"iteration_{iteration:05d}.npz"

    def write(self, iteration: int, rows: dict[str, np.ndarray], metrics: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        path = self.path(iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **rows, **{METRICS_KEY: np.array(json.dumps(metrics))})
        partial = path.parent / (path.name + ".partial")
        partial.write_bytes(buffer.getvalue())
        partial.rename(path)
        for old in range(iteration - KEEP_ROLLOUTS, -1, -1):
            if not self.path(old).exists():
                break
            self.path(old).unlink()

    def read(self, iteration: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        path = self.path(iteration)
        if not path.exists():
            raise FileNotFoundError(f"the checkpoint is in the middle of iteration {iteration + 1}, whose rollout "
                                    f"{path} is gone; restore the file or remove the workdir's newer checkpoints")
        with np.load(io.BytesIO(path.read_bytes())) as saved:
            return ({name: saved[name] for name in saved.files if name != METRICS_KEY},
                    json.loads(str(saved[METRICS_KEY])))
