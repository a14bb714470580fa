"""What a sampled answer is worth, and what the policy and its reference say of it.

    reward models   `score_answers` (each model loaded, used and freed in turn: rejection sampling)
                    and `reward_model_scores` (models held for a whole run: the on-policy stages),
                    both as token ids, with the paper's combination (`reward.combine`)
    programs        `RewardProgram`: a `module:function(prompt_messages, answer_text) -> float`
    log-probs       `training_rows` lays prompt + answer out as the training step reads them;
                    `token_log_probs` / `policy_and_value_terms` by the training forward pass,
                    `in_chunks` over a rollout

`FrozenModels` are the models an on-policy run reads and never trains (`load_frozen_models`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import reward, sharding
from llama2_jax.checkpoint.load import load_pretrained, score_head
from llama2_jax.errors import ConfigError
from llama2_jax.generate import to_host
from llama2_jax.length_batches import place_rows
from llama2_jax.model import lora
from llama2_jax.rollout.sampler import Answer
from llama2_jax.train import ppo_loss
from llama2_jax.train.losses import token_log_partition_and_target


@dataclasses.dataclass(frozen=True)
class Scores:
    """Both reward models' σ scores of each answer, their combination R_c and where it took the safety
    score; without a safety model the helpfulness scores are all three."""

    helpfulness: np.ndarray
    safety: np.ndarray
    combined: np.ndarray
    to_safety: np.ndarray

    def metrics(self) -> dict[str, float]:
        return {"reward_helpfulness": float(np.mean(self.helpfulness)), "reward_safety": float(np.mean(self.safety)),
                "safety_share": float(np.mean(self.to_safety))}


def combined_scores(helpfulness: np.ndarray, safety: np.ndarray | None, is_safety: np.ndarray) -> Scores:
    for name, scores in (("helpfulness", helpfulness), ("safety", safety)):
        if scores is not None and not np.all(np.isfinite(scores)):
            raise FloatingPointError(f"the {name} reward model gave {np.sum(~np.isfinite(scores))} NaN or infinite "
                                     "scores; check its checkpoint (its training may have diverged)")
    if safety is None:
        return Scores(helpfulness, helpfulness, helpfulness, np.zeros(len(helpfulness), bool))
    return Scores(helpfulness, safety, reward.combine(helpfulness, safety, is_safety),
                  np.asarray(is_safety, bool) | (safety < reward.SAFETY_THRESHOLD))


def score_answers(sequences: Sequence[Sequence[int]], is_safety: np.ndarray, *, helpfulness_rm: str,
                  safety_rm: str, batch_size: int, mesh: Mesh, rules, dtype: str) -> Scores:
    """Both reward models' scores of every sequence, each model loaded, used and freed in turn."""
    def scores_of(path: str) -> np.ndarray:
        model = load_pretrained(path, dtype, param_dtype=dtype, mesh=mesh, rules=rules)
        return reward.score_tokens(model, sequences, batch_size=batch_size, mesh=mesh, rules=rules)

    return combined_scores(scores_of(helpfulness_rm), scores_of(safety_rm) if safety_rm else None, is_safety)


@dataclasses.dataclass(frozen=True)
class FrozenModels:
    """The models an on-policy run reads and never trains, on the run's mesh."""

    reference: nnx.Module | None  # None: the policy trains adapters, and its base is the reference
    helpfulness: nnx.Module | None  # None: rewards from a program, or see below
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

    def scores(self, sequences: Sequence[Sequence[int]], is_safety: np.ndarray, batch_size: int, mesh: Mesh,
               rules) -> Scores:
        """Both reward models' scores of each sequence and their combination."""
        def scores_of(model):
            return reward.score_tokens(model, sequences, batch_size=batch_size, mesh=mesh, rules=rules)

        return combined_scores(scores_of(self.helpfulness), scores_of(self.safety) if self.safety else None,
                               is_safety)


def load_frozen_models(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict, mesh: Mesh, rules, *,
                       reward_models: bool = True) -> FrozenModels:
    """The reference (`init_checkpoint`) and the reward models `section` names (its `helpfulness_rm`,
    `safety_rm`, `frozen_dtype`; none when `reward_models` is false), loaded on `mesh`."""
    dtype, compute = section.frozen_dtype, config.model.compute_dtype

    def load(path):
        return load_pretrained(path, compute, param_dtype=dtype, mesh=mesh, rules=rules,
                               max_seq_len=config.model.max_seq_len)

    # A policy that trains adapters holds its base already: that is the reference. A value model that
    # trains adapters on the helpfulness RM holds that RM's base: with the RM's head, that is the RM.
    adapters = "lora" in config and config.lora.rank > 0
    shares_base = reward_models and adapters and section.get("value_init") == "helpfulness_rm"
    return FrozenModels(
        None if adapters else load(config.init_checkpoint),
        load(section.helpfulness_rm) if reward_models and not shares_base else None,
        load(section.safety_rm) if reward_models and section.safety_rm else None,
        helpfulness_head=score_head(section.helpfulness_rm, mesh) if shares_base else None)


class RewardProgram:
    """A reward computed by a program, `module:function` called as `function(prompt_messages,
    answer_text) -> float` with the dialog the answer continues and the answer's text."""

    def __init__(self, spec: str, key: str):
        self.spec, self.key = spec, key
        module_name, colon, name = spec.partition(":")
        if not colon or not module_name or not name:
            raise ConfigError(f"{key} is {spec!r}; give it as module:function, e.g. "
                              "llama2_jax.data.instructions:follows_instruction")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # whatever the module raises on import: one line that names it
            raise ValueError(f"{key} {spec!r}: cannot import {module_name}: {type(error).__name__}: "
                             f"{error}") from None
        self.function = getattr(module, name, None)
        if not callable(self.function):
            raise ValueError(f"{key} {spec!r}: {module_name} has no function {name}")

    def __call__(self, dialogs: Sequence[list], texts: Sequence[str]) -> np.ndarray:
        values = [self.function(dialog, text) for dialog, text in zip(dialogs, texts)]
        for value in values:
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{self.key} {self.spec} returned {value!r}; it must return a finite number")
        return np.array(values, np.float32)


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
                             f"train.seq_len {seq_len}; raise it or lower the stage's max_new_tokens")
        length = len(tokens)
        fields["inputs"][row, :length] = tokens
        fields["targets"][row, :length - 1] = tokens[1:]
        fields["positions"][row, :length] = np.arange(length)
        fields["segment_ids"][row, :length] = 1
        fields["answer_mask"][row, len(prompt) - 1:length - 1] = 1
    return fields


@functools.partial(jax.jit, static_argnums=0)
def token_log_probs(graphdef, state, inputs, targets, positions, segment_ids):
    """A language model's log-probs of the targets, by the training forward pass."""
    model = nnx.merge(graphdef, state)
    log_z, target_logit = token_log_partition_and_target(model(inputs, positions=positions, segment_ids=segment_ids),
                                                         targets)
    return target_logit - log_z


@functools.partial(jax.jit, static_argnums=0)
def policy_and_value_terms(graphdef, state, inputs, targets, positions, segment_ids):
    """An actor-critic's log-probs of the targets and its values, by the training forward pass."""
    model = nnx.merge(graphdef, state)
    logits = model.policy(inputs, positions=positions, segment_ids=segment_ids)
    log_z, target_logit = token_log_partition_and_target(logits, targets)
    return target_logit - log_z, model.value.token_scores(inputs, positions=positions, segment_ids=segment_ids)


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


def log_probs_of(model: nnx.Module, rows: dict[str, np.ndarray], chunk: int, mesh: Mesh, rules) -> np.ndarray:
    """`model`'s log-probs of the rows' targets, `chunk` rows at a time."""
    return in_chunks(token_log_probs, *nnx.split(model), rows, chunk, mesh, rules)


def check_finite(what: str, *arrays: np.ndarray) -> None:
    """One clear error when a rollout's log-probs or values are not finite: the policy has diverged."""
    if not all(np.all(np.isfinite(array)) for array in arrays):
        raise FloatingPointError(f"{what} gave NaN or infinite log-probs or values on the rollout; the policy has "
                                 "diverged: lower optimizer.peak_lr and rerun, which resumes from the newest "
                                 "checkpoint")
