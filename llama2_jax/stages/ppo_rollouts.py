"""PPO's batches, made by the policy being trained: one rollout per iteration, then its mini-batches.

    sample     `ppo.rollouts` prompts answered by the current policy, in the decoding layout (one
               copy of its weights made for the rollout and freed after it)
    score      both reward models read each (prompt, answer) as token ids; the reference policy's and
               the current policy's log-probs and the value model's values come from the training
               forward pass, so the first mini-batch's ratio is 1
    advantage  WHITEN(LOGIT(R_c)) - beta KL per token, GAE, advantages whitened
               (llama2_jax/train/ppo_loss.py)
    train      the rollout shuffled into `ppo.rollouts / train.global_batch_size` mini-batches, each
               one optimizer step, `ppo.epochs` times over

`RolloutBatches` is the on-policy iterator the loop asks for each batch (`next_batch(model)`); its
position (iteration and mini-batch) is saved in every checkpoint. Iteration i draws its prompts and
its sampling keys from `train.seed` and i alone, and its rollout is written whole to
`rollouts/iteration_NNNNN.npz` before its first step, so a run stopped in the middle of an iteration
resumes on the very rollout it was training on. The frozen models (reference policy, reward models)
are loaded once, on the run's mesh, and never saved. GRPO (llama2_jax/stages/grpo.py) runs on the same
iterator with groups of answers per prompt and a scoring of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import generate, reward, sharding
from llama2_jax.model import lora
from llama2_jax.generate import to_host
from llama2_jax.length_batches import place_rows
from llama2_jax.stages.rejection_phases import Answer, part_seed, sample_answers, scored_sequence
from llama2_jax.train import ppo_loss
from llama2_jax.train.losses import token_log_partition_and_target

KEEP_ROLLOUTS = 2  # rollout files kept: the iteration in training and the one before
METRICS_KEY = "_metrics"  # the rollout's metrics, as JSON, beside its rows in its file


@dataclasses.dataclass(frozen=True)
class FrozenModels:
    """The models PPO reads and never trains, on the run's mesh."""

    reference: nnx.Module | None  # None: the policy trains adapters, and its base is the reference
    helpfulness: nnx.Module | None  # None: rewards from a program (GRPO's grpo.reward_fn), or see below
    safety: nnx.Module | None
    # The helpfulness RM's score head, when the value model trains adapters on that RM's base: the
    # RM is then that base with this head (`scoring_with`), and is not held a second time.
    helpfulness_head: jax.Array | None = None

    def reference_of(self, policy: nnx.Module) -> nnx.Module:
        """The reference the KL holds `policy` near: the frozen one, or the policy's own base."""
        return self.reference if self.reference is not None else lora.without_adapters(policy)

    def scoring_with(self, value: nnx.Module) -> FrozenModels:
        """These models with the helpfulness RM made from `value`'s base (adapters off) under the
        RM's own head, where the two share a base; as they are otherwise."""
        if self.helpfulness_head is None:
            return self
        graphdef, state = nnx.split(value)
        head = ("score", "kernel")
        scorer = [(path, variable.replace(self.helpfulness_head) if path == head
                   else variable.replace(jnp.zeros_like(variable[...])) if isinstance(variable, nnx.LoRAParam)
                   else variable) for path, variable in nnx.to_flat_state(state)]
        return dataclasses.replace(self, helpfulness=nnx.merge(graphdef, nnx.from_flat_state(scorer)),
                                   helpfulness_head=None)


def check_no_dropout(config) -> None:
    """PPO and GRPO compare the training forward pass with the rollout's log-probs (the ratio is 1
    on the first mini-batch); adapter dropout in one and not the other would bias every ratio."""
    if config.lora.dropout:
        from llama2_jax.errors import ConfigError

        raise ConfigError(f"lora.dropout is {config.lora.dropout}; PPO and GRPO train adapters without dropout, as "
                          "their ratios compare the training pass with the rollout's: set --config.lora.dropout=0")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a rollout needs from the config."""

    rollouts: int
    mini_batch: int
    epochs: int
    max_new_tokens: int
    temperature: float
    kl_coef: float
    gamma: float
    lam: float
    missing_eos_penalty: float
    sample_batch_size: int
    score_batch_size: int
    seq_len: int
    seed: int
    eos_id: int
    samples: int = 1  # answers per prompt (GRPO's group size); rollouts // samples prompts an iteration

    @property
    def steps_per_iteration(self) -> int:
        return self.rollouts // self.mini_batch * self.epochs


@dataclasses.dataclass(frozen=True)
class Scored:
    """Sampled answers as training rows, with everything the loss and the metrics need."""

    rows: dict[str, np.ndarray]  # ppo_loss's fields
    helpfulness: np.ndarray
    safety: np.ndarray
    combined: np.ndarray
    to_safety: np.ndarray  # where combine took the safety score
    finished: np.ndarray
    kl: np.ndarray  # k1 per token, 0 off the answers
    kl_k3: np.ndarray


def training_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Answer], seq_len: int) -> dict[str, np.ndarray]:
    """Prompt + answer per row, right-padded to `seq_len`, in the training rows' coordinates
    (ppo_loss.py): `answer_mask[t]` is 1 where the token at t + 1 is an answer token."""
    rows = len(answers)
    fields = {name: np.zeros((rows, seq_len), np.int32) for name in ppo_loss.INT_FIELDS}
    fields["answer_mask"] = np.zeros((rows, seq_len), np.float32)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens = [*prompt, *answer.tokens]
        if len(tokens) > seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens and an answer of {len(answer.tokens)} do not fit "
                             f"train.seq_len {seq_len}; raise it or lower ppo.max_new_tokens")
        length = len(tokens)
        fields["inputs"][row, :length] = tokens
        fields["targets"][row, :length - 1] = tokens[1:]
        fields["positions"][row, :length] = np.arange(length)
        fields["segment_ids"][row, :length] = 1
        fields["answer_mask"][row, len(prompt) - 1:length - 1] = 1
    return fields


@functools.partial(jax.jit, static_argnums=0)
def _policy_terms(graphdef, state, inputs, targets, positions, segment_ids):
    """The actor-critic's log-probs of the targets and its values, by the training forward pass."""
    model = nnx.merge(graphdef, state)
    logits = model.policy(inputs, positions=positions, segment_ids=segment_ids)
    log_z, target_logit = token_log_partition_and_target(logits, targets)
    return target_logit - log_z, model.value.token_scores(inputs, positions=positions, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def token_log_probs(graphdef, state, inputs, targets, positions, segment_ids):
    model = nnx.merge(graphdef, state)
    log_z, target_logit = token_log_partition_and_target(model(inputs, positions=positions, segment_ids=segment_ids),
                                                         targets)
    return target_logit - log_z


def in_chunks(function, graphdef, state, rows: dict[str, np.ndarray], chunk: int, mesh: Mesh, rules) -> list:
    """`function` over the rows, `chunk` rows at a time on the mesh (the last chunk padded with empty
    rows); its outputs on the host, joined."""
    outputs = []
    names = ("inputs", "targets", "positions", "segment_ids")
    count = len(rows["inputs"])
    with sharding.logical_context(mesh, rules):
        for start in range(0, count, chunk):
            part = {name: rows[name][start:start + chunk] for name in names}
            padding = chunk - len(part["inputs"])
            part = {name: np.pad(values, ((0, padding), (0, 0))) for name, values in part.items()}
            placed = place_rows(part, mesh, rules)
            result = function(graphdef, state, *(placed[name] for name in names))
            outputs.append(jax.tree.map(lambda values: to_host(values)[:chunk - padding], result))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def reward_model_scores(frozen: FrozenModels, prompts: Sequence[Sequence[int]], answers: Sequence[Answer],
                        is_safety: np.ndarray, settings: Settings, mesh: Mesh,
                        rules) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both reward models' scores of each (prompt, answer), their combination and where it took the
    safety score; without a safety model the helpfulness score is all three."""
    sequences = [scored_sequence(prompt, answer, settings.eos_id) for prompt, answer in zip(prompts, answers)]
    helpfulness = reward.score_tokens(frozen.helpfulness, sequences, batch_size=settings.score_batch_size,
                                      mesh=mesh, rules=rules)
    if frozen.safety is None:
        safety, combined, to_safety = helpfulness, helpfulness, np.zeros(len(answers), bool)
    else:
        safety = reward.score_tokens(frozen.safety, sequences, batch_size=settings.score_batch_size, mesh=mesh,
                                     rules=rules)
        combined = reward.combine(helpfulness, safety, is_safety)
        to_safety = np.asarray(is_safety, bool) | (safety < reward.SAFETY_THRESHOLD)
    for name, scores in (("helpfulness", helpfulness), ("safety", safety)):
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError(f"the {name} reward model gave {np.sum(~np.isfinite(scores))} NaN or infinite "
                                     "scores; check its checkpoint (its training may have diverged)")
    return helpfulness, safety, combined, to_safety


def score_rollout(model: nnx.Module, frozen: FrozenModels, prompts: Sequence[Sequence[int]], answers: Sequence[Answer],
                  is_safety: np.ndarray, settings: Settings, mesh: Mesh, rules) -> Scored:
    """The answers as training rows with their scores, log-probs, values, advantages and returns."""
    rows = training_rows(prompts, answers, settings.seq_len)
    mask = rows["answer_mask"]
    helpfulness, safety, combined, to_safety = reward_model_scores(frozen.scoring_with(model.value), prompts, answers,
                                                                   is_safety, settings, mesh, rules)
    graphdef, state = nnx.split(model)
    log_probs, values = in_chunks(_policy_terms, graphdef, state, rows, settings.mini_batch, mesh, rules)
    reference_graphdef, reference_state = nnx.split(frozen.reference_of(model.policy))
    reference = in_chunks(token_log_probs, reference_graphdef, reference_state, rows, settings.mini_batch,
                           mesh, rules)
    if not (np.all(np.isfinite(log_probs)) and np.all(np.isfinite(values)) and np.all(np.isfinite(reference))):
        raise FloatingPointError("the policy, value model or reference gave NaN or infinite log-probs or values on "
                                 "the rollout; the policy has diverged: lower optimizer.peak_lr or ppo.value_lr and "
                                 "rerun, which resumes from the newest checkpoint")
    kl, kl_k3 = ppo_loss.kl_estimates(log_probs, reference, mask)
    finished = np.array([answer.finished for answer in answers])
    scores = ppo_loss.whiten(ppo_loss.logit(combined)) - settings.missing_eos_penalty * ~finished
    token_rewards = ppo_loss.token_rewards(scores, kl, mask, settings.kl_coef)
    advantages, returns = ppo_loss.gae(token_rewards, values, mask, settings.gamma, settings.lam)
    rows.update(old_log_probs=log_probs * mask, old_values=values * mask,
                advantages=ppo_loss.whiten(advantages, mask), returns=returns)
    return Scored(rows, helpfulness, safety, combined, to_safety, finished, kl, kl_k3)


def rollout_metrics(scored: Scored, seconds: dict[str, float], new_tokens: int) -> dict[str, float]:
    """What an iteration's rollout was: rewards, KL to the reference per answer (both estimators),
    lengths, EOS rate, the phases' seconds and the sampling rate."""
    lengths = scored.rows["answer_mask"].sum(axis=1)
    values = {
        "reward_helpfulness": float(np.mean(scored.helpfulness)),
        "reward_safety": float(np.mean(scored.safety)),
        "reward_combined": float(np.mean(scored.combined)),
        "safety_share": float(np.mean(scored.to_safety)),
        "kl_reference": float(np.mean(scored.kl.sum(axis=1))),
        "kl_reference_k3": float(np.mean(scored.kl_k3.sum(axis=1))),
        "answer_length": float(np.mean(lengths)),
        "eos_rate": float(np.mean(scored.finished)),
    }
    return {**values, **timing_metrics(seconds, new_tokens)}


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


# How a rollout is scored: (trained model, frozen models, each answer's prompt tokens, the answers,
# each answer's index in the prompt list) -> (training rows, the rollout's metrics).
ScoreFn = Callable[[nnx.Module, FrozenModels, list, list, np.ndarray], tuple[dict[str, np.ndarray], dict[str, float]]]


class RolloutBatches:
    """The loop's on-policy iterator (llama2_jax/train/task.py): `next_batch(model)` gives the next
    mini-batch, making the next iteration's rollout from `model` when the last one is used up.

    An iteration answers `rollouts // samples` prompts `samples` times each (one prefill per prompt).
    PPO's defaults: one answer per prompt from `model.policy`, scored by `score_rollout`. GRPO
    (llama2_jax/stages/grpo.py) samples a group per prompt from the model itself and scores with its
    own `score`."""

    def __init__(self, settings: Settings, prompt_tokens: Sequence[Sequence[int]], is_safety: np.ndarray,
                 frozen: Callable[[], FrozenModels], directory: epath.Path, mesh: Mesh, rules, *,
                 policy_of: Callable[[nnx.Module], nnx.Module] = lambda model: model.policy,
                 score: ScoreFn | None = None):
        self.settings, self.prompt_tokens, self.is_safety = settings, prompt_tokens, np.asarray(is_safety, bool)
        self.frozen_models, self.frozen = frozen, None
        self.policy_of, self.score = policy_of, score or self.score_ppo
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
        self.frozen = self.frozen or self.frozen_models()
        train_seconds = time.perf_counter() - self.last_rollout_end if self.last_rollout_end else None
        indices = iteration_prompts(settings.rollouts // settings.samples, len(self.prompt_tokens), self.iteration,
                                    settings.seed)
        prompts = [self.prompt_tokens[index] for index in indices]
        start = time.perf_counter()
        answers, _, _ = sample_answers(
            self.policy_of(model), prompts, samples=settings.samples,
            sampling=generate.SamplingParams(temperature=settings.temperature),
            max_new_tokens=settings.max_new_tokens, eos_id=settings.eos_id, batch_size=settings.sample_batch_size,
            seed=lambda part: part_seed(settings.seed, self.iteration, part), mesh=self.mesh, rules=self.rules,
            saved=lambda part: None, save=lambda part, found, seconds: None, stop=lambda: False)
        sampled = time.perf_counter()
        answer_indices = indices[[answer.prompt for answer in answers]]
        rows, metrics = self.score(model, self.frozen, [self.prompt_tokens[index] for index in answer_indices],
                                   answers, answer_indices)
        seconds = {"rollout": sampled - start, "scoring": time.perf_counter() - sampled}
        if train_seconds is not None:
            seconds["train"] = train_seconds
        made = {"iteration": float(self.iteration + 1), **metrics,
                **timing_metrics(seconds, sum(len(answer.tokens) for answer in answers))}
        self.write(self.iteration, rows, made)
        self.last_rollout_end = time.perf_counter()
        return rows, made

    def score_ppo(self, model: nnx.Module, frozen: FrozenModels, prompts: list, answers: list,
                  indices: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """PPO's scoring: both reward models, the KL-penalised rewards, GAE (`score_rollout`)."""
        scored = score_rollout(model, frozen, prompts, answers, self.is_safety[indices], self.settings, self.mesh,
                               self.rules)
        return scored.rows, rollout_metrics(scored, {}, 0)

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
