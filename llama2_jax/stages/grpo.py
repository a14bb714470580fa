"""GRPO (Shao et al. 2024, DeepSeekMath; not in the Llama 2 paper): PPO without a value model, each
prompt answered by a group of G samples whose rewards, relative to the group's, are the advantages.

    python -m llama2_jax grpo --config=configs/grpo.py:tiny --workdir=runs/grpo
    python -m llama2_jax grpo --config=configs/grpo.py:tiny,instructions --workdir=runs/grpo_instructions

It runs on PPO's machinery (llama2_jax/stages/ppo_rollouts.py): each of `grpo.iterations` iterations
answers `grpo.rollouts / grpo.group_size` prompts `grpo.group_size` times each from the current
policy (one prefill per prompt), scores every answer, and trains on the rollout in mini-batches of
`train.global_batch_size` rows with the loss of llama2_jax/train/grpo_loss.py. A reward is the
combination of the helpfulness and safety reward models (`reward.combine`, as PPO's), or a program's:
`grpo.reward_fn="module:function"`, called as `function(prompt_messages, answer_text) -> float`
with the dialog the answer continues and the answer's text (EOS dropped, stripped). The old
log-probs come from the training forward pass, the reference's from the frozen `init_checkpoint`
(in `grpo.frozen_dtype`, loaded once, as are the reward models when no program scores). Checkpoints
hold the policy, its optimizer and the position in the rollouts, so a stopped run resumes to the step.

    WORKDIR/train/            the loop's workdir: checkpoints/, metrics.jsonl, rollouts/
    WORKDIR/held_out/step_N.jsonl   the held-out prompts answered at step N and scored
    WORKDIR/state/, model_config.json, tokenizer.model
                              the trained policy, written at the end
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import storage
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.stages import ppo_rollouts, rejection_files
from llama2_jax.stages.initial import load_initial_model, start_from_checkpoint
from llama2_jax.stages.ppo import Frozen, batch_spec, rollout_prompts
from llama2_jax.stages.ppo_rollouts import (Answer, FrozenModels, RolloutBatches, Settings, in_chunks,
                                            reward_model_scores, token_log_probs, training_rows)
from llama2_jax.stages.rejection import PromptSet, check_models_of
from llama2_jax.stages.rejection_phases import answer_held_out
from llama2_jax.train import grpo_loss, ppo_loss
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.task import Task

STAGE = "grpo"
CONFIG_DOCS = {
    "init_checkpoint": "the policy to start from, and the frozen reference the KL term holds it near",
    "grpo.group_size": "G, answers sampled per prompt, whose rewards are compared with one another (at least 2)",
    "grpo.rollouts": "answers sampled per iteration (a multiple of grpo.group_size and of train.global_batch_size)",
    "grpo.iterations": "GRPO iterations: a rollout, then optimizer steps on it",
    "grpo.epochs": "passes over each rollout, one optimizer step per mini-batch",
    "grpo.kl_coef": "beta, the weight of the k3 KL to the reference in the loss",
    "grpo.clip": "epsilon of the clipped policy ratio",
    "grpo.scale_rewards": "divide each group's centred rewards by its standard deviation (+1e-6)",
    "grpo.reward_fn": "module:function scoring function(prompt_messages, answer_text) -> float (empty: the reward "
                      "models)",
    "grpo.helpfulness_rm": "workdir or checkpoint of the helpfulness reward model (unused with grpo.reward_fn)",
    "grpo.safety_rm": "workdir or checkpoint of the safety reward model (empty: helpfulness only)",
    "grpo.temperature": "rollout sampling temperature (no top-p: the policy's own distribution)",
    "grpo.max_new_tokens": "longest answer, in tokens",
    "grpo.batch_size": "rows per sampling call",
    "grpo.score_batch_size": "sequences per reward-model batch",
    "grpo.frozen_dtype": "storage dtype of the reference policy and the reward models",
    "grpo.eval_prompts": "held-out prompts (data.eval_split) answered (temperature 0.6, top-p 0.9) and scored at "
                         "every evaluation (train.eval_every steps; 0: none)",
}


def settings_of(config: ml_collections.ConfigDict, eos_id: int) -> Settings:
    """PPO's rollout settings for GRPO: groups of `group_size`, and no GAE (its fields unused)."""
    grpo = config.grpo
    return Settings(rollouts=grpo.rollouts, mini_batch=config.train.global_batch_size, epochs=grpo.epochs,
                    max_new_tokens=grpo.max_new_tokens, temperature=grpo.temperature, kl_coef=grpo.kl_coef,
                    gamma=1.0, lam=1.0, missing_eos_penalty=0.0, sample_batch_size=grpo.batch_size,
                    score_batch_size=grpo.score_batch_size, seq_len=config.train.seq_len, seed=config.train.seed,
                    eos_id=eos_id, samples=grpo.group_size)


def load_reward_fn(spec: str) -> Callable[[list, str], float]:
    """The function `grpo.reward_fn` names as module:function, imported once."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise ConfigError(f"grpo.reward_fn is {spec!r}; give it as module:function, e.g. "
                          "llama2_jax.data.instructions:follows_instruction")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # whatever the module raises on import: one line that names it
        raise ValueError(f"grpo.reward_fn {spec!r}: cannot import {module_name}: {type(error).__name__}: "
                         f"{error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"grpo.reward_fn {spec!r}: {module_name} has no function {name}")
    return function


class Rewards:
    """Each answer's reward and what the rollout's metrics add about it: a program's
    (`grpo.reward_fn`) or the reward models' combination (`reward.combine`)."""

    def __init__(self, spec: str, tokenizer: Tokenizer | None):
        self.spec, self.tokenizer = spec, tokenizer
        self.function = load_reward_fn(spec) if spec else None

    def __call__(self, frozen: FrozenModels, prompts: PromptSet, tokens: Sequence[Sequence[int]],
                 answers: Sequence[Answer], indices: np.ndarray, settings: Settings, mesh: Mesh,
                 rules) -> tuple[np.ndarray, dict[str, float]]:
        """`indices[i]`: answer i's prompt in `prompts`; `tokens[i]`: that prompt's token ids."""
        if self.function is None:
            helpfulness, safety, combined, to_safety = reward_model_scores(
                frozen, tokens, answers, prompts.is_safety[indices], settings, mesh, rules)
            return combined, {"reward_helpfulness": float(np.mean(helpfulness)),
                              "reward_safety": float(np.mean(safety)), "safety_share": float(np.mean(to_safety))}
        dialogs = [prompts.prompts[prompts.indices[index]].dialog() for index in indices]
        return np.array([self.program_reward(dialog, self.text(answer))
                         for dialog, answer in zip(dialogs, answers)], np.float32), {}

    def text(self, answer: Answer) -> str:
        return self.tokenizer.decode(list(answer.tokens[:-1] if answer.finished else answer.tokens)).strip()

    def program_reward(self, messages: list, text: str) -> float:
        value = self.function(messages, text)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"grpo.reward_fn {self.spec} returned {value!r}; it must return a finite number")
        return float(value)


def score_groups(model: nnx.Module, frozen: FrozenModels, tokens: list, answers: list, indices: np.ndarray, *,
                 rewards: Callable, settings: Settings, scale: bool, mesh: Mesh,
                 rules) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A rollout's rows for GRPO's loss: the answers' rewards, their group-relative advantages on every
    answer token, and the policy's and the reference's log-probs (the training forward pass: the
    first mini-batch's ratio is 1); and the rollout's metrics."""
    rows = training_rows(tokens, answers, settings.seq_len)
    mask = rows["answer_mask"]
    scores, metrics = rewards(frozen, tokens, answers, indices)
    log_probs, reference = policy_and_reference(model, frozen.reference_of(model), rows, settings, mesh, rules)
    groups = np.array([answer.prompt for answer in answers])
    advantages = grpo_loss.group_advantages(scores, groups, scale)
    kl, kl_k3 = ppo_loss.kl_estimates(log_probs, reference, mask)
    rows.update(old_log_probs=log_probs * mask, reference_log_probs=reference * mask,
                advantages=advantages[:, None] * mask)
    spreads = np.array([scores[groups == group].std() for group in np.unique(groups)])
    return rows, {
        "reward": float(np.mean(scores)),
        **metrics,
        "reward_group_std": float(np.mean(spreads)),
        "groups_all_equal": float(np.mean(spreads == 0)),  # groups that teach nothing: advantage 0
        "kl_reference": float(np.mean(kl.sum(axis=1))),
        "kl_reference_k3": float(np.mean(kl_k3.sum(axis=1))),
        "answer_length": float(np.mean(mask.sum(axis=1))),
        "eos_rate": float(np.mean([answer.finished for answer in answers])),
    }


def policy_and_reference(model: nnx.Module, reference: nnx.Module, rows: dict[str, np.ndarray], settings: Settings,
                         mesh: Mesh, rules) -> tuple[np.ndarray, np.ndarray]:
    """The policy's and the reference's log-probs of the rows' targets; one clear error if not finite."""
    log_probs = in_chunks(token_log_probs, *nnx.split(model), rows, settings.mini_batch, mesh, rules)
    reference_log_probs = in_chunks(token_log_probs, *nnx.split(reference), rows, settings.mini_batch, mesh, rules)
    if not (np.all(np.isfinite(log_probs)) and np.all(np.isfinite(reference_log_probs))):
        raise FloatingPointError("the policy or the reference gave NaN or infinite log-probs on the rollout; the "
                                 "policy has diverged: lower optimizer.peak_lr and rerun, which resumes from the "
                                 "newest checkpoint")
    return log_probs, reference_log_probs


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
              training: PromptSet | None = None, held_out: PromptSet | None = None,
              workdir: str | None = None, rewards: Rewards | None = None) -> Task:
    """GRPO on the one loop: the policy, its loss and the grouped rollouts as batches. Without prompts
    (`aot`, `bench`) the task compiles and benchmarks its step but makes no rollouts."""
    grpo = config.grpo
    settings = settings_of(config, tokenizer.eos_id if tokenizer else 2)
    frozen: dict[int, Frozen] = {}
    rollouts: list[RolloutBatches] = []  # the run's iterator, which knows the step an evaluation is at

    def frozen_models(mesh: Mesh, rules) -> Frozen:
        return frozen.setdefault(id(mesh), Frozen(config, mesh, rules, grpo, reward_models=not grpo.reward_fn))

    def train_batches(mesh: Mesh, rules) -> RolloutBatches:
        if training is None or rewards is None:
            raise ValueError("this GRPO task was built without prompts; `python -m llama2_jax grpo` builds one with "
                             "them")

        def rewards_of(frozen_now, tokens, answers, indices):
            return rewards(frozen_now, training, tokens, answers, indices, settings, mesh, rules)

        def score(model, frozen_now, tokens, answers, indices):
            return score_groups(model, frozen_now, tokens, answers, indices, rewards=rewards_of, settings=settings,
                                scale=grpo.scale_rewards, mesh=mesh, rules=rules)

        rollouts.append(RolloutBatches(settings, training.tokens, training.is_safety, frozen_models(mesh, rules),
                                       storage.as_path(_train_dir(workdir)), mesh, rules,
                                       policy_of=lambda model: model, score=score))
        return rollouts[-1]

    def model_evals(model, mesh: Mesh, rules) -> dict[str, float]:
        step = rollouts[-1].steps_done() if rollouts else 0
        return evaluate(model, frozen_models(mesh, rules)(), rewards, held_out, settings, workdir, step, mesh, rules)

    return Task(
        model_config=model_config_from(config),
        loss_fn=grpo_loss.make_grpo_loss(clip=grpo.clip, kl_coef=grpo.kl_coef),
        batch_spec=batch_spec(config.train.seq_len, grpo_loss.FLOAT_FIELDS),
        train_batches=train_batches,
        initial_model=lambda mesh, rules: load_initial_model(config, mesh, rules),
        model_evals=model_evals if held_out and rewards else None,
        model_kind="llama",
        tokenizer_path=os.fspath(tokenizer.path) if tokenizer else None,
        on_policy=True,
    )


def _train_dir(workdir: str | None) -> str:
    return os.fspath(storage.as_path(workdir) / "train") if workdir else "train"


def evaluate(model: nnx.Module, frozen: FrozenModels, rewards: Rewards, prompts: PromptSet, settings: Settings,
             workdir: str | None, step: int, mesh: Mesh, rules) -> dict[str, float]:
    """The held-out prompts answered by the policy as chat answers them (the same seeds at every
    evaluation), rewarded as the rollouts are, with each answer's KL to the reference (the sum over
    its tokens of log pi - log pi_ref); written to held_out/step_N.jsonl."""
    answers = answer_held_out(model, prompts.tokens, max_new_tokens=settings.max_new_tokens, eos_id=settings.eos_id,
                              batch_size=settings.sample_batch_size, seed=settings.seed, mesh=mesh, rules=rules)
    indices = np.array([answer.prompt for answer in answers])
    tokens = [prompts.tokens[index] for index in indices]
    scores, metrics = rewards(frozen, prompts, tokens, answers, indices, settings, mesh, rules)
    rows = training_rows(tokens, answers, settings.seq_len)
    log_probs, reference = policy_and_reference(model, frozen.reference_of(model), rows, settings, mesh, rules)
    kl = ((log_probs - reference) * rows["answer_mask"]).sum(axis=1)
    records = [{"prompt": prompts.indices[answer.prompt], "messages": prompts.prompts[prompts.indices[answer.prompt]]
                .dialog(), "answer": rewards.text(answer), "finished": answer.finished, "reward": float(score),
                "kl": float(answer_kl)} for answer, score, answer_kl in zip(answers, scores, kl)]
    if workdir:
        rejection_files.write_jsonl(storage.as_path(workdir) / "held_out" / f"step_{step}.jsonl", records)
    return {"reward": float(np.mean(scores)), **metrics, "kl_reference": float(np.mean(kl)),
            "answer_length": float(np.mean([len(answer.tokens) for answer in answers]))}


def check_config(config: ml_collections.ConfigDict) -> None:
    """One ConfigError naming the key for a value the stage cannot use."""
    grpo, batch = config.grpo, config.train.global_batch_size
    ppo_rollouts.check_no_dropout(config)
    if grpo.group_size < 2:
        raise ConfigError(f"grpo.group_size {grpo.group_size} must be at least 2: GRPO's advantages compare the "
                          "answers of a group with one another")
    if grpo.rollouts < grpo.group_size or grpo.rollouts % grpo.group_size:
        raise ConfigError(f"grpo.rollouts {grpo.rollouts} is not a multiple of grpo.group_size {grpo.group_size}; "
                          "make it one (rollouts / group_size prompts are answered per iteration)")
    if grpo.rollouts < batch or grpo.rollouts % batch:
        raise ConfigError(f"grpo.rollouts {grpo.rollouts} is not a multiple of the mini-batch, "
                          f"train.global_batch_size {batch}; make it one")
    if not grpo.reward_fn and not grpo.helpfulness_rm:
        raise ConfigError("set grpo.helpfulness_rm to a reward model (python -m llama2_jax reward writes one) or "
                          "grpo.reward_fn to a module:function that scores answers")
    if grpo.iterations < 1 or grpo.epochs < 1:
        raise ConfigError(f"grpo.iterations {grpo.iterations} and grpo.epochs {grpo.epochs} must be at least 1")
    if grpo.max_new_tokens < 1 or grpo.temperature <= 0:
        raise ConfigError(f"grpo.max_new_tokens {grpo.max_new_tokens} must be at least 1 and grpo.temperature "
                          f"{grpo.temperature} above 0 (GRPO samples)")
    if not 0 < grpo.clip < 1 or grpo.kl_coef < 0:
        raise ConfigError(f"grpo.clip {grpo.clip} must be in (0, 1) and grpo.kl_coef {grpo.kl_coef} at least 0")


def set_steps(config: ml_collections.ConfigDict) -> None:
    """train.steps from the iterations; one log line per iteration."""
    per_iteration = config.grpo.rollouts // config.train.global_batch_size * config.grpo.epochs
    config.train.steps = config.grpo.iterations * per_iteration
    config.train.log_every = per_iteration


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """GRPO as `config` says in `workdir`, resuming from the newest checkpoint there."""
    check_config(config)
    grpo = config.grpo
    tokenizer = start_from_checkpoint(config, kind="llama")
    rewards = Rewards(grpo.reward_fn, tokenizer)  # a reward_fn that cannot be imported fails before any model loads
    reward_models = {} if grpo.reward_fn else {"grpo.helpfulness_rm": (grpo.helpfulness_rm, "reward"),
                                               "grpo.safety_rm": (grpo.safety_rm, "reward")}
    context = check_models_of(config, tokenizer, reward_models, "grpo.max_new_tokens", grpo.max_new_tokens)
    training, held_out = rollout_prompts(config, tokenizer, "grpo", context)
    set_steps(config)
    _print(f"GRPO: {grpo.iterations} iterations of {grpo.rollouts // grpo.group_size} prompts x {grpo.group_size} "
           f"answers from {len(training.indices)} training prompts ({training.skipped} too long, skipped), "
           f"{config.train.steps} optimizer steps; rewards from "
           f"{grpo.reward_fn or 'the reward models'}")
    train_dir = _train_dir(workdir)
    result = train(config, train_dir, make_task(config, tokenizer, training, held_out, workdir, rewards))
    if result.interrupted:
        return result
    rejection_files.export_policy(workdir, int(result.state.step), result.model(), tokenizer.path)
    _print(f"the trained policy is in {workdir} (python -m llama2_jax chat --checkpoint {workdir})")
    from llama2_jax.cli import draw_figures

    draw_figures(train_dir)
    return result


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
