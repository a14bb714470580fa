"""The on-policy stage: a policy trained on its own answers, with the algorithm as a plug-in.

    python -m llama2_jax ppo          --config=configs/ppo.py:tiny          --workdir=runs/ppo
    python -m llama2_jax grpo         --config=configs/grpo.py:tiny         --workdir=runs/grpo
    python -m llama2_jax rloo         --config=configs/rloo.py:tiny         --workdir=runs/rloo
    python -m llama2_jax reinforce_pp --config=configs/reinforce_pp.py:tiny --workdir=runs/reinforce_pp

Each of `SECTION.iterations` iterations answers `SECTION.rollouts / SECTION.group_size` prompts
`group_size` times each from the current policy, scores every answer (the reward models' combination
R_c, or a program's reward with `SECTION.reward_fn`), takes the policy's and the reference's log-probs
by the training forward pass (so the first mini-batch's ratio is 1), and trains on the rollout in
mini-batches of `train.global_batch_size` rows, `SECTION.epochs` times over, on the one training
loop. What differs between algorithms is an `Algorithm` (llama2_jax/stages/ppo.py, grpo.py, rloo.py,
reinforce_pp.py): its advantages on the host, its loss, its own config keys, and whether it trains a
value model beside the policy. The rest is written once, here: the frozen models (the reference,
`init_checkpoint` again, and the reward models, loaded once in `SECTION.frozen_dtype`), resume to the
step (checkpoints hold the trained model, its optimizer and the position in the rollouts), the
held-out evaluations, early stopping, the metrics, the export and the figures.

    WORKDIR/train/            the loop's workdir: checkpoints/, metrics.jsonl, rollouts/
    WORKDIR/held_out/step_N.jsonl   the held-out prompts answered at step N and scored
    WORKDIR/state/, model_config.json, tokenizer.model, policy.json
                              the trained policy, written at the end: what chat, eval and later
                              stages load from WORKDIR
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import storage
from llama2_jax.reward import UNSAFE_SCORE
from llama2_jax.data.batch import BatchSpec, Field
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.plots import draw_figures
from llama2_jax.rollout import files
from llama2_jax.rollout.iterations import RolloutBatches, Settings
from llama2_jax.rollout.prompts import PromptSet, check_models_of, on_policy_prompts
from llama2_jax.rollout.sampler import Answer, Sampler, answer_held_out, scored_sequence
from llama2_jax.rollout.scoring import (FrozenModels, RewardProgram, check_finite, in_chunks, load_frozen_models,
                                        log_probs_of, policy_and_value_terms, training_rows)
from llama2_jax.stages.initial import load_initial_model, start_from_checkpoint
from llama2_jax.train import ppo_loss
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.task import Task

EARLY_STOP_FILE = "early_stopped.json"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A scored rollout as an algorithm reads it. Token arrays are [answers, train.seq_len] in the
    training rows' coordinates (llama2_jax/train/ppo_loss.py: entry t is about the token at t + 1)."""

    mask: np.ndarray  # 1 on answer tokens
    rewards: np.ndarray  # [answers]: R_c, or the program's reward
    finished: np.ndarray  # [answers]: ended by EOS
    groups: np.ndarray  # [answers]: the prompt each answers (answers to one prompt form a group)
    log_probs: np.ndarray  # the policy's, at sampling time
    reference: np.ndarray  # the reference's
    values: np.ndarray | None  # the value model's, when the algorithm trains one
    kl: np.ndarray  # k1 = log pi - log pi_ref per answer token, 0 elsewhere


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What one on-policy algorithm adds to the stage. Its config section is named `name`."""

    name: str
    title: str  # as logs name it
    config_docs: Mapping[str, str]  # its own keys, beside the stage's (SHARED_DOCS)
    # (rollout, section) -> the training rows' `advantages` (and any field of its own), and metrics.
    advantages: Callable[[Rollout, ml_collections.ConfigDict], tuple[dict[str, np.ndarray], dict[str, float]]]
    loss: Callable[[ml_collections.ConfigDict], Callable]  # section -> loss_fn(model, batch)
    float_fields: tuple[str, ...]  # the training rows' float fields, answer_mask first
    check: Callable[[ml_collections.ConfigDict], None] = lambda config: None  # its own keys
    min_group_size: int = 1  # answers per prompt it needs (0: one, and no group_size key)
    # A value model trained beside the policy (PPO): the model is an ActorCritic from `initial_model`.
    value_model: bool = False
    initial_model: Callable | None = None  # (config, mesh, rules) -> the model to train
    before_training: Callable[[ml_collections.ConfigDict], str] | None = None  # checks; a note for the log
    peak_lrs: Callable[[ml_collections.ConfigDict], dict[str, float]] | None = None
    figure: Callable[[str], str] | None = None  # (train workdir) -> the path of a figure of its own

    def policy_of(self, model: nnx.Module) -> nnx.Module:
        return model.policy if self.value_model else model

    def group_size(self, section: ml_collections.ConfigDict) -> int:
        return section.group_size if self.min_group_size else 1


SHARED_DOCS = {
    "init_checkpoint": "the policy to start from, and the frozen reference the KL term holds it near",
    "iterations": "iterations: a rollout, then optimizer steps on it",
    "rollouts": "answers sampled per iteration (a multiple of train.global_batch_size, the mini-batch)",
    "epochs": "passes over each rollout, one optimizer step per mini-batch",
    "kl_coef": "beta, the weight of the KL to the reference",
    "clip": "epsilon of the clipped policy ratio",
    "temperature": "rollout sampling temperature (no top-p: the policy's own distribution)",
    "max_new_tokens": "longest answer, in tokens",
    "helpfulness_rm": "workdir or checkpoint of the helpfulness reward model",
    "safety_rm": "workdir or checkpoint of the safety reward model (empty: helpfulness only)",
    "reward_fn": "module:function scoring function(prompt_messages, answer_text) -> float (empty: the reward "
                 "models)",
    "group_size": "answers sampled per prompt, each prompt's group",
    "frozen_dtype": "storage dtype of the reference policy and the reward models",
    "batch_size": "answers decoding together (the sampler's slots, refilled as answers end)",
    "score_batch_size": "sequences per reward-model batch",
    "eval_prompts": "held-out prompts (data.eval_split) answered (temperature 0.6, top-p 0.9) and scored at every "
                    "evaluation (train.eval_every steps; 0: none)",
    "early_stop_kl": "end the run at an evaluation whose held-out KL to the reference is above this (0: never)",
    "patience": "end the run after this many evaluations without a better held-out reward (0: never)",
}


def config_docs(algorithm: Algorithm) -> dict[str, str]:
    """What the keys of an algorithm's section mean: the stage's and its own. An algorithm with one
    answer per prompt has no group_size; one that trains a value model (PPO) takes no reward_fn."""
    left_out = {key for key, absent in (("group_size", not algorithm.min_group_size),
                                        ("reward_fn", algorithm.value_model)) if absent}
    shared = {key if key == "init_checkpoint" else f"{algorithm.name}.{key}": text
              for key, text in SHARED_DOCS.items() if key not in left_out}
    return {**shared, **algorithm.config_docs}


# ---- rewards ---------------------------------------------------------------------------------------


class Rewards:
    """Each answer's reward and what the rollout's metrics say of it: the reward models' combination
    R_c (`reward_combined`, with both scores and the safety share), or a program's (`reward`)."""

    def __init__(self, section: ml_collections.ConfigDict, name: str, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        spec = section.get("reward_fn", "")
        self.program = RewardProgram(spec, f"{name}.reward_fn") if spec else None

    @property
    def source(self) -> str:
        return self.program.spec if self.program else "the reward models"

    def __call__(self, frozen: FrozenModels, prompts: PromptSet, tokens: list, answers: list[Answer],
                 indices: np.ndarray, settings: Settings, mesh: Mesh, rules) -> tuple[np.ndarray, dict, dict]:
        """The rewards, their metrics, and per-answer fields for the held-out records.
        `indices[i]`: answer i's prompt in `prompts`; `tokens[i]`: that prompt's token ids."""
        if self.program:
            rewards = self.program([prompts.dialog(index) for index in indices],
                                   [answer.text(self.tokenizer) for answer in answers])
            return rewards, {"reward": float(np.mean(rewards))}, {"reward": rewards}
        sequences = [scored_sequence(prompt, answer, settings.eos_id) for prompt, answer in zip(tokens, answers)]
        scores = frozen.scores(sequences, prompts.is_safety[indices], settings.score_batch_size, mesh, rules)
        return scores.combined, {"reward_combined": float(np.mean(scores.combined)), **scores.metrics()}, {
            "helpfulness": scores.helpfulness, "safety": scores.safety, "combined": scores.combined}


# ---- a rollout, scored -----------------------------------------------------------------------------


def score_rollout(algorithm: Algorithm, section: ml_collections.ConfigDict, model: nnx.Module,
                  frozen: FrozenModels, rewards: Rewards, prompts: PromptSet, answers: list[Answer],
                  indices: np.ndarray, settings: Settings, mesh: Mesh,
                  rules) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A rollout's training rows (the algorithm's fields filled) and its metrics."""
    tokens = [prompts.tokens[index] for index in indices]
    rows = training_rows(tokens, answers, settings.seq_len)
    mask = rows["answer_mask"]
    reward, metrics, _ = rewards(frozen.scoring_with(model.value) if algorithm.value_model else frozen, prompts,
                                 tokens, answers, indices, settings, mesh, rules)
    log_probs, values, reference = policy_terms(algorithm, model, frozen, rows, settings.mini_batch, mesh, rules)
    kl, kl_k3 = ppo_loss.kl_estimates(log_probs, reference, mask)
    finished = np.array([answer.finished for answer in answers])
    rollout = Rollout(mask, reward, finished, np.array([answer.prompt for answer in answers]), log_probs, reference,
                      values, kl)
    terms = {"old_log_probs": log_probs * mask, "reference_log_probs": reference * mask,
             "old_values": None if values is None else values * mask}
    rows.update({name: value for name, value in terms.items() if name in algorithm.float_fields})
    fields, own_metrics = algorithm.advantages(rollout, section)
    rows.update(fields)
    return rows, {**metrics, **own_metrics, "kl_reference": float(np.mean(kl.sum(axis=1))),
                  "kl_reference_k3": float(np.mean(kl_k3.sum(axis=1))),
                  "answer_length": float(np.mean(mask.sum(axis=1))), "eos_rate": float(np.mean(finished))}


def policy_terms(algorithm: Algorithm, model: nnx.Module, frozen: FrozenModels, rows: dict, chunk: int, mesh: Mesh,
                 rules) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The policy's log-probs of the rows' targets, its value model's values (None without one) and the
    reference's log-probs, by the training forward pass; one clear error if any is not finite."""
    if algorithm.value_model:
        log_probs, values = in_chunks(policy_and_value_terms, *nnx.split(model), rows, chunk, mesh, rules)
    else:
        log_probs, values = log_probs_of(model, rows, chunk, mesh, rules), None
    reference = log_probs_of(frozen.reference_of(algorithm.policy_of(model)), rows, chunk, mesh, rules)
    check_finite("the policy, its reference or its value model", log_probs, reference,
                 *(() if values is None else (values,)))
    return log_probs, values, reference


# ---- the task --------------------------------------------------------------------------------------


def settings_of(algorithm: Algorithm, config: ml_collections.ConfigDict, eos_id: int) -> Settings:
    section = config[algorithm.name]
    return Settings(rollouts=section.rollouts, mini_batch=config.train.global_batch_size, epochs=section.epochs,
                    max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                    slots=section.batch_size, score_batch_size=section.score_batch_size,
                    seq_len=config.train.seq_len, seed=config.train.seed, eos_id=eos_id,
                    samples=algorithm.group_size(section))


def batch_spec(seq_len: int, float_fields: tuple[str, ...]) -> BatchSpec:
    fields = {name: Field((seq_len,), "int32", "positions" if name == "positions" else
                          "ones" if name == "segment_ids" else "tokens") for name in ppo_loss.INT_FIELDS}
    fields.update({name: Field((seq_len,), "float32", "ones" if name == "answer_mask" else "zeros")
                   for name in float_fields})
    return BatchSpec(fields, packed=False, weight_field="answer_mask")


def make_task(algorithm: Algorithm, config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
              training: PromptSet | None = None, held_out: PromptSet | None = None, workdir: str | None = None,
              rewards: Rewards | None = None) -> Task:
    """The algorithm on the one loop: the model, its loss and the rollouts as batches. Without prompts
    (`aot`, `bench`) the task compiles and benchmarks its step but makes no rollouts."""
    section = config[algorithm.name]
    settings = settings_of(algorithm, config, tokenizer.eos_id if tokenizer else 2)
    frozen: dict[int, FrozenModels] = {}
    samplers: dict[int, Sampler] = {}  # one decoding copy per mesh, shared by the rollouts and evaluations
    rollouts: list[RolloutBatches] = []  # the run's iterator, which knows the step an evaluation is at

    def frozen_models(mesh: Mesh, rules) -> FrozenModels:
        if id(mesh) not in frozen:
            frozen[id(mesh)] = load_frozen_models(config, section, mesh, rules,
                                                  reward_models=rewards is None or rewards.program is None)
        return frozen[id(mesh)]

    def sampler(mesh: Mesh, rules) -> Sampler:
        return samplers.setdefault(id(mesh), Sampler(None, mesh, rules))  # its policy: `update` before sampling

    def train_batches(mesh: Mesh, rules) -> RolloutBatches:
        if training is None or rewards is None:
            raise ValueError(f"this {algorithm.title} task was built without prompts; `python -m llama2_jax "
                             f"{algorithm.name}` builds one with them")

        def score(model, answers, indices):
            return score_rollout(algorithm, section, model, frozen_models(mesh, rules), rewards, training, answers,
                                 indices, settings, mesh, rules)

        rollouts.append(RolloutBatches(settings, training.tokens, sampler(mesh, rules), algorithm.policy_of, score,
                                       storage.as_path(_train_dir(workdir)), mesh, rules))
        return rollouts[-1]

    def model_evals(model, mesh: Mesh, rules) -> dict[str, float]:
        step = rollouts[-1].steps_done() if rollouts else 0
        return evaluate(algorithm, model, frozen_models(mesh, rules), sampler(mesh, rules), rewards, held_out,
                        settings, workdir, step, mesh, rules)

    return Task(
        model_config=model_config_from(config),
        loss_fn=algorithm.loss(section),
        batch_spec=batch_spec(config.train.seq_len, algorithm.float_fields),
        train_batches=train_batches,
        initial_model=lambda mesh, rules: (algorithm.initial_model or load_initial_model)(config, mesh, rules),
        model_evals=model_evals if held_out and rewards else None,
        model_kind="actor_critic" if algorithm.value_model else "llama",
        tokenizer_path=os.fspath(tokenizer.path) if tokenizer else None,
        early_stop=early_stop_rule(algorithm.name, section),
        on_policy=True,
        peak_lrs=algorithm.peak_lrs(config) if algorithm.peak_lrs else None,
    )


def _train_dir(workdir: str | None) -> str:
    return os.fspath(storage.as_path(workdir) / "train") if workdir else "train"


def early_stop_rule(name: str, section: ml_collections.ConfigDict) -> Callable[[dict[str, float]], str | None] | None:
    """Held-out KL above SECTION.early_stop_kl, or SECTION.patience evaluations without a better
    held-out reward."""
    early_stop_kl, patience = section.get("early_stop_kl", 0), section.get("patience", 0)
    if not early_stop_kl and not patience:
        return None
    history = {"best": -math.inf, "since": 0}

    def should_stop(values: dict[str, float]) -> str | None:
        kl = values.get("kl_reference")
        reward_now = values.get("reward_combined", values.get("reward"))
        if early_stop_kl and kl is not None and kl > early_stop_kl:
            return f"held-out KL to the reference {kl:.4g} > {name}.early_stop_kl {early_stop_kl:g}"
        if patience and reward_now is not None:
            if reward_now > history["best"]:
                history["best"], history["since"] = reward_now, 0
            else:
                history["since"] += 1
                if history["since"] >= patience:
                    return (f"no better held-out reward than {history['best']:.4g} in {patience} "
                            f"evaluations ({name}.patience)")
        return None

    return should_stop


# ---- evaluation ------------------------------------------------------------------------------------


def evaluate(algorithm: Algorithm, model: nnx.Module, frozen: FrozenModels, sampler: Sampler, rewards: Rewards,
             prompts: PromptSet, settings: Settings, workdir: str | None, step: int, mesh: Mesh,
             rules) -> dict[str, float]:
    """The held-out prompts answered by the policy as chat answers them (the same seeds at every
    evaluation), rewarded as the rollouts are, with each answer's KL to the reference (the sum over
    its tokens of log pi - log pi_ref); written to held_out/step_N.jsonl."""
    policy = algorithm.policy_of(model)
    sampler.update(policy)
    answers = answer_held_out(sampler, prompts.tokens, max_new_tokens=settings.max_new_tokens,
                              eos_id=settings.eos_id, slots=settings.slots, seed=settings.seed)
    indices = np.array([answer.prompt for answer in answers])
    tokens = [prompts.tokens[index] for index in indices]
    _, _, scores = rewards(frozen.scoring_with(model.value) if algorithm.value_model else frozen, prompts, tokens,
                           answers, indices, settings, mesh, rules)
    rows = training_rows(tokens, answers, settings.seq_len)
    log_probs, _, reference = policy_terms(dataclasses.replace(algorithm, value_model=False), policy, frozen, rows,
                                           settings.mini_batch, mesh, rules)
    kl = ((log_probs - reference) * rows["answer_mask"]).sum(axis=1)
    records = [{"prompt": prompts.indices[index], "messages": prompts.dialog(index),
                "safety_prompt": bool(prompts.is_safety[index]), "answer": answer.text(rewards.tokenizer),
                "finished": answer.finished, **{name: float(values[row]) for name, values in scores.items()},
                "kl": float(kl[row])} for row, (index, answer) in enumerate(zip(indices, answers))]
    if workdir:
        files.write_jsonl(held_out_path(workdir, step), records)
    return {**held_out_metrics(records), "kl_reference": float(np.mean(kl)),
            "answer_length": float(np.mean([len(answer.tokens) for answer in answers]))}


def held_out_metrics(records: list[dict]) -> dict[str, float]:
    """The mean reward of the held-out answers; with the reward models, R_c over all prompts and per
    kind, both scores, and the share of answers the safety model scores as unsafe, per kind."""
    if "combined" not in records[0]:
        return {"reward": float(np.mean([record["reward"] for record in records]))}
    values = {"reward_combined": float(np.mean([record["combined"] for record in records])),
              "reward_helpfulness": float(np.mean([record["helpfulness"] for record in records])),
              "reward_safety": float(np.mean([record["safety"] for record in records]))}
    for kind, is_safety in (("safety_prompts", True), ("helpfulness_prompts", False)):
        chosen = [record for record in records if record["safety_prompt"] == is_safety]
        if chosen:
            values[f"reward_{kind}"] = float(np.mean([record["combined"] for record in chosen]))
            values[f"unsafe_{kind}"] = float(np.mean([record["safety"] < UNSAFE_SCORE for record in chosen]))
    return values


def held_out_path(workdir: str, step: int):
    return storage.as_path(workdir) / "held_out" / f"step_{step}.jsonl"


# ---- the run ---------------------------------------------------------------------------------------


def check_config(algorithm: Algorithm, config: ml_collections.ConfigDict) -> None:
    """One ConfigError naming the key for a value the stage cannot use."""
    name, section, batch = algorithm.name, config[algorithm.name], config.train.global_batch_size
    if config.lora.dropout:
        raise ConfigError(f"lora.dropout is {config.lora.dropout}; {algorithm.title} trains adapters without "
                          "dropout, as its ratios compare the training pass with the rollout's: set "
                          "--config.lora.dropout=0")
    group = algorithm.group_size(section)
    if group < algorithm.min_group_size:
        raise ConfigError(f"{name}.group_size {group} must be at least {algorithm.min_group_size}: its advantages "
                          "compare the answers of a group with one another")
    if section.rollouts < group or section.rollouts % group:
        raise ConfigError(f"{name}.rollouts {section.rollouts} is not a multiple of {name}.group_size {group}; "
                          "make it one (rollouts / group_size prompts are answered per iteration)")
    if section.rollouts < batch or section.rollouts % batch:
        raise ConfigError(f"{name}.rollouts {section.rollouts} is not a multiple of the mini-batch, "
                          f"train.global_batch_size {batch}; make it one")
    if not section.get("reward_fn") and not section.helpfulness_rm:
        raise ConfigError(f"set {name}.helpfulness_rm to a reward model (python -m llama2_jax reward writes one)"
                          + (f" or {name}.reward_fn to a module:function that scores answers"
                             if "reward_fn" in section else ""))
    if section.iterations < 1 or section.epochs < 1:
        raise ConfigError(f"{name}.iterations {section.iterations} and {name}.epochs {section.epochs} must be at "
                          "least 1")
    if section.max_new_tokens < 1 or section.temperature <= 0:
        raise ConfigError(f"{name}.max_new_tokens {section.max_new_tokens} must be at least 1 and "
                          f"{name}.temperature {section.temperature} above 0 ({algorithm.title} samples)")
    if not 0 < section.clip < 1 or section.kl_coef < 0:
        raise ConfigError(f"{name}.clip {section.clip} must be in (0, 1) and {name}.kl_coef {section.kl_coef} at "
                          "least 0")
    algorithm.check(config)


def set_steps(algorithm: Algorithm, config: ml_collections.ConfigDict) -> None:
    """train.steps from the iterations; one log line per iteration."""
    section = config[algorithm.name]
    per_iteration = section.rollouts // config.train.global_batch_size * section.epochs
    config.train.steps = section.iterations * per_iteration
    config.train.log_every = per_iteration


def run(algorithm: Algorithm, config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """The algorithm as `config` says in `workdir`, resuming from the newest checkpoint there."""
    check_config(algorithm, config)
    name, section = algorithm.name, config[algorithm.name]
    tokenizer = start_from_checkpoint(config, kind="llama")
    rewards = Rewards(section, name, tokenizer)  # a reward_fn that cannot be imported fails before any model loads
    reward_models = {} if rewards.program else {f"{name}.helpfulness_rm": (section.helpfulness_rm, "reward"),
                                                f"{name}.safety_rm": (section.safety_rm, "reward")}
    context = check_models_of(config, tokenizer, reward_models, f"{name}.max_new_tokens", section.max_new_tokens)
    training, held_out = on_policy_prompts(config, tokenizer, name, context)
    set_steps(algorithm, config)
    note = algorithm.before_training(config) if algorithm.before_training else ""
    group = algorithm.group_size(section)
    answers = f"{section.rollouts // group} prompts x {group} answers" if group > 1 else f"{section.rollouts} answers"
    _print(f"{algorithm.title}: {section.iterations} iterations of {answers} from {len(training.indices)} training "
           f"prompts ({training.skipped} too long, skipped), "
           f"{config.train.steps} optimizer steps; rewards from {rewards.source}{note}")
    train_dir = _train_dir(workdir)
    stopped_early = storage.as_path(train_dir) / EARLY_STOP_FILE
    if stopped_early.exists():  # the run ended there: what is left is the export
        config.optimizer.decay_steps = config.optimizer.decay_steps or config.train.steps
        config.train.steps = json.loads(stopped_early.read_text())["step"]
    result = train(config, train_dir, make_task(algorithm, config, tokenizer, training, held_out, workdir, rewards))
    if result.interrupted:
        return result
    if result.early_stopped and jax.process_index() == 0:
        stopped_early.write_text(json.dumps({"step": int(result.state.step), "why": result.early_stopped}))
    files.export_policy(workdir, algorithm.policy_of(result.model()), tokenizer.path,
                        trained={"step": int(result.state.step)})
    _print(f"the trained policy is in {workdir} (python -m llama2_jax chat --checkpoint {workdir})")
    draw_figures(train_dir)
    if algorithm.figure and jax.process_index() == 0:
        try:
            log.info("drew %s", algorithm.figure(train_dir))
        except (OSError, ValueError) as error:
            log.warning("could not draw %s's figure: %s", algorithm.title, error)
    return result


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
