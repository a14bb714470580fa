"""PPO, the paper's second RLHF stage (§3.2.3): the policy trained on its own answers, rewarded by the
helpfulness and safety reward models and held near the policy it started from.

    python -m llama2_jax ppo --config=configs/ppo.py:tiny --workdir=runs/ppo
    python -m llama2_jax ppo --config=configs/ppo.py:7b --config.init_checkpoint=runs/rejection-7b \
        --config.ppo.helpfulness_rm=runs/rm-h-7b --config.ppo.safety_rm=runs/rm-s-7b --workdir=/data/runs/ppo-7b

The run holds five models on one mesh: the policy and the value model, trained (`ActorCritic`, each
with an AdamW of its own: `optimizer.peak_lr` and `ppo.value_lr`), and three frozen ones, loaded once
in `ppo.frozen_dtype`: the reference policy (`init_checkpoint` again), which the KL term holds the
policy near, and the two reward models. With `lora.rank` > 0 the policy and the value model train
adapters on frozen bases; the policy's base, adapters off, is the reference, and the value
model's base (the helpfulness RM's, with `ppo.value_init` helpfulness_rm) under the RM's own head
is the helpfulness RM: three bases, the policy's, the helpfulness RM's and the safety RM. Each of
`ppo.iterations` iterations samples `ppo.rollouts` answers from the current policy and trains on
them (llama2_jax/stages/ppo_rollouts.py) with the losses of llama2_jax/train/ppo_loss.py, on the
one training loop: checkpoints hold both trained
models, both optimizers and the position in the rollouts, so a stopped run (SIGTERM, Ctrl-C: exit
status 75) resumes to the step. The frozen models are outside the checkpoints; `train/config.json`
names them.

    WORKDIR/train/            the loop's workdir: checkpoints/, metrics.jsonl, rollouts/, ppo.png
    WORKDIR/held_out/step_N.jsonl   the held-out prompts answered at step N and scored
    WORKDIR/state/, model_config.json, tokenizer.model
                              the trained policy, written at the end: what chat, eval and later
                              stages load from WORKDIR
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import plots, sharding, storage
from llama2_jax.checkpoint.load import checkpoint_config, load_pretrained, score_head
from llama2_jax.data.batch import BatchSpec, Field
from llama2_jax.data.prompts import split_prompts
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.model.llama import ActorCritic
from llama2_jax.model.quantize import stored_bits
from llama2_jax.stages import ppo_rollouts, rejection_files, rejection_metrics
from llama2_jax.stages.initial import SHAPE_FIELDS, load_initial_model, start_from_checkpoint
from llama2_jax.stages.ppo_rollouts import FrozenModels, RolloutBatches, Settings
from llama2_jax.stages.rejection import PromptSet, check_models_of, encode_prompts
from llama2_jax.stages.rejection_phases import CUT_ANSWER_EOS, answer_held_out
from llama2_jax.train import ppo_loss
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.task import Task

STAGE = "ppo"
CONFIG_DOCS = {
    "init_checkpoint": "the policy to start from, and the frozen reference the KL term holds it near",
    "ppo.helpfulness_rm": "workdir or checkpoint of the helpfulness reward model",
    "ppo.safety_rm": "workdir or checkpoint of the safety reward model (empty: helpfulness only)",
    "ppo.value_init": "where the value model starts: helpfulness_rm, or policy (its backbone, a new head)",
    "ppo.iterations": "PPO iterations: a rollout, then optimizer steps on it",
    "ppo.rollouts": "answers sampled per iteration (a multiple of train.global_batch_size, the mini-batch)",
    "ppo.epochs": "passes over each rollout, one optimizer step per mini-batch",
    "ppo.value_lr": "the value model's constant learning rate (the policy's: optimizer.peak_lr)",
    "ppo.kl_coef": "beta, the weight of the per-token KL to the reference in the reward",
    "ppo.clip": "epsilon of the clipped policy ratio",
    "ppo.value_clip": "how far a value may move from the rollout's before its loss is clipped",
    "ppo.gamma": "GAE discount",
    "ppo.lam": "GAE lambda",
    "ppo.temperature": "rollout sampling temperature (no top-p: the policy's own distribution)",
    "ppo.max_new_tokens": "longest answer, in tokens",
    "ppo.missing_eos_penalty": "subtracted from the whitened score of an answer cut off before EOS",
    "ppo.frozen_dtype": "storage dtype of the reference policy and the reward models",
    "ppo.batch_size": "rows per sampling call",
    "ppo.score_batch_size": "sequences per reward-model batch",
    "ppo.eval_prompts": "held-out prompts (data.eval_split) answered (temperature 0.6, top-p 0.9) and scored at "
                        "every evaluation (train.eval_every steps; 0: none)",
    "ppo.early_stop_kl": "end the run at an evaluation whose held-out KL to the reference is above this (0: never)",
    "ppo.patience": "end the run after this many evaluations without a better held-out reward (0: never)",
    "ppo.device_memory_gib": "memory of one device for the pre-flight check (0: what the device reports)",
}
VALUE_INITS = ("helpfulness_rm", "policy")
EARLY_STOP_FILE = "early_stopped.json"
log = logging.getLogger(__name__)


def settings_of(config: ml_collections.ConfigDict, eos_id: int) -> Settings:
    ppo = config.ppo
    return Settings(rollouts=ppo.rollouts, mini_batch=config.train.global_batch_size, epochs=ppo.epochs,
                    max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, kl_coef=ppo.kl_coef,
                    gamma=ppo.gamma, lam=ppo.lam, missing_eos_penalty=ppo.missing_eos_penalty,
                    sample_batch_size=ppo.batch_size, score_batch_size=ppo.score_batch_size,
                    seq_len=config.train.seq_len, seed=config.train.seed, eos_id=eos_id)


def batch_spec(seq_len: int, float_fields: tuple[str, ...] = ppo_loss.FLOAT_FIELDS) -> BatchSpec:
    fields = {name: Field((seq_len,), "int32", "positions" if name == "positions" else
                          "ones" if name == "segment_ids" else "tokens") for name in ppo_loss.INT_FIELDS}
    fields.update({name: Field((seq_len,), "float32", "ones" if name == "answer_mask" else "zeros")
                   for name in float_fields})
    return BatchSpec(fields, packed=False, weight_field="answer_mask")


class Frozen:
    """The frozen models, loaded at first use and shared by the rollouts and the evaluations: the
    reference (`init_checkpoint`) and the reward models `section` names (its `helpfulness_rm`,
    `safety_rm`, `frozen_dtype`: config.ppo, or config.grpo; no reward models when `reward_models`
    is false)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules,
                 section: ml_collections.ConfigDict | None = None, reward_models: bool = True):
        self.config, self.mesh, self.rules, self.models = config, mesh, rules, None
        self.section = config.ppo if section is None else section
        self.reward_models = reward_models

    def __call__(self) -> FrozenModels:
        if self.models is None:
            section, dtype = self.section, self.section.frozen_dtype
            compute = self.config.model.compute_dtype

            def load(path):
                return load_pretrained(path, compute, param_dtype=dtype, mesh=self.mesh, rules=self.rules,
                                       max_seq_len=self.config.model.max_seq_len)

            rewards = self.reward_models
            # A policy that trains adapters holds its base already: that is the reference. A value
            # model that trains adapters on the helpfulness RM holds that RM's base: with the RM's
            # head, that is the helpfulness RM.
            adapters = "lora" in self.config and self.config.lora.rank > 0
            shares_base = rewards and adapters and section.get("value_init") == "helpfulness_rm"
            self.models = FrozenModels(
                None if adapters else load(self.config.init_checkpoint),
                load(section.helpfulness_rm) if rewards and not shares_base else None,
                load(section.safety_rm) if rewards and section.safety_rm else None,
                helpfulness_head=score_head(section.helpfulness_rm, self.mesh) if shares_base else None)
        return self.models


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
              training: PromptSet | None = None, held_out: PromptSet | None = None,
              workdir: str | None = None) -> Task:
    """PPO on the one loop: the actor-critic, its losses and the rollouts as batches. Without prompts
    (`aot`, `bench`) the task compiles and benchmarks its step but makes no rollouts."""
    settings = settings_of(config, tokenizer.eos_id if tokenizer else 2)
    frozen: dict[int, Frozen] = {}
    rollouts: list[RolloutBatches] = []  # the run's iterator, which knows the step an evaluation is at

    def frozen_models(mesh: Mesh, rules) -> Frozen:
        return frozen.setdefault(id(mesh), Frozen(config, mesh, rules))

    def train_batches(mesh: Mesh, rules) -> RolloutBatches:
        if training is None:
            raise ValueError("this PPO task was built without prompts; `python -m llama2_jax ppo` builds one with them")
        rollouts.append(RolloutBatches(settings, training.tokens, training.is_safety, frozen_models(mesh, rules),
                                       storage.as_path(_train_dir(workdir)), mesh, rules))
        return rollouts[-1]

    def model_evals(model, mesh: Mesh, rules) -> dict[str, float]:
        step = rollouts[-1].steps_done() if rollouts else 0
        return evaluate(model, frozen_models(mesh, rules)(), held_out, settings, tokenizer, workdir, step, mesh, rules)

    return Task(
        model_config=model_config_from(config),
        loss_fn=ppo_loss.make_ppo_loss(clip=config.ppo.clip, value_clip=config.ppo.value_clip),
        batch_spec=batch_spec(config.train.seq_len),
        train_batches=train_batches,
        initial_model=lambda mesh, rules: initial_actor_critic(config, mesh, rules),
        model_evals=model_evals if held_out else None,
        model_kind="actor_critic",
        tokenizer_path=os.fspath(tokenizer.path) if tokenizer else None,
        early_stop=early_stop_rule(config.ppo),
        on_policy=True,
        peak_lrs={"policy": config.optimizer.peak_lr, "value": config.ppo.value_lr},
    )


def _train_dir(workdir: str | None) -> str:
    return os.fspath(storage.as_path(workdir) / "train") if workdir else "train"


def initial_actor_critic(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> ActorCritic:
    """The policy from init_checkpoint; the value model from the helpfulness reward model, or from the
    policy's backbone under a new head (ppo.value_init)."""
    policy = load_initial_model(config, mesh, rules)
    value_config = config.copy_and_resolve_references()
    if config.ppo.value_init == "helpfulness_rm":
        value_config.init_checkpoint = config.ppo.helpfulness_rm
        value = load_initial_model(value_config, mesh, rules)
    else:
        value = load_initial_model(config, mesh, rules, kind="reward")
    return ActorCritic(policy.config, policy=policy, value=value)


def early_stop_rule(settings: ml_collections.ConfigDict) -> Callable[[dict[str, float]], str | None] | None:
    """Held-out KL above ppo.early_stop_kl, or ppo.patience evaluations without a better held-out reward."""
    if not settings.early_stop_kl and not settings.patience:
        return None
    history = {"best": -math.inf, "since": 0}

    def should_stop(values: dict[str, float]) -> str | None:
        kl, reward_now = values.get("kl_reference"), values.get("reward_combined")
        if settings.early_stop_kl and kl is not None and kl > settings.early_stop_kl:
            return f"held-out KL to the reference {kl:.4g} > ppo.early_stop_kl {settings.early_stop_kl:g}"
        if settings.patience and reward_now is not None:
            if reward_now > history["best"]:
                history["best"], history["since"] = reward_now, 0
            else:
                history["since"] += 1
                if history["since"] >= settings.patience:
                    return (f"no better held-out reward than {history['best']:.4g} in {settings.patience} "
                            "evaluations (ppo.patience)")
        return None

    return should_stop


def evaluate(model: ActorCritic, frozen: FrozenModels, prompts: PromptSet, settings: Settings, tokenizer: Tokenizer,
             workdir: str | None, step: int, mesh: Mesh, rules) -> dict[str, float]:
    """The held-out prompts answered by the policy as chat answers them (the same seeds at every
    evaluation), scored by both reward models, with each answer's KL to the reference (the sum over
    its tokens of log pi - log pi_ref); written to held_out/step_N.jsonl."""
    answers = answer_held_out(model.policy, prompts.tokens, max_new_tokens=settings.max_new_tokens,
                              eos_id=settings.eos_id, batch_size=settings.sample_batch_size, seed=settings.seed,
                              mesh=mesh, rules=rules)
    tokens = [prompts.tokens[answer.prompt] for answer in answers]
    scored = ppo_rollouts.score_rollout(model, frozen, tokens, answers, prompts.is_safety, settings, mesh, rules)
    records = []
    for index, answer in enumerate(answers):
        prompt = prompts.indices[answer.prompt]
        text_tokens = answer.tokens[:-1] if answer.finished else answer.tokens
        records.append({
            "prompt": prompt, "messages": prompts.prompts[prompt].dialog(),
            "safety_prompt": bool(prompts.is_safety[answer.prompt]),
            "answer": tokenizer.decode(list(text_tokens)).strip(), "finished": answer.finished,
            "helpfulness": float(scored.helpfulness[index]), "safety": float(scored.safety[index]),
            "combined": float(scored.combined[index]), "kl": float(scored.kl[index].sum())})
    if workdir:
        rejection_files.write_jsonl(held_out_path(workdir, step), records)
    values = {name.removeprefix("eval_"): value for name, value in rejection_metrics.held_out_metrics(records).items()}
    values["reward_combined"] = values.pop("reward")
    values["kl_reference"] = float(np.mean([record["kl"] for record in records]))
    values["answer_length"] = float(np.mean([len(answer.tokens) for answer in answers]))
    return values


def held_out_path(workdir: str, step: int):
    return storage.as_path(workdir) / "held_out" / f"step_{step}.jsonl"


def check_config(config: ml_collections.ConfigDict) -> None:
    """One ConfigError naming the key for a value the stage cannot use."""
    ppo, batch = config.ppo, config.train.global_batch_size
    ppo_rollouts.check_no_dropout(config)
    if not ppo.helpfulness_rm:
        raise ConfigError("set ppo.helpfulness_rm to the helpfulness reward model (python -m llama2_jax reward "
                          "writes one)")
    if ppo.value_init not in VALUE_INITS:
        raise ConfigError(f"ppo.value_init is {ppo.value_init!r}; choose one of {', '.join(VALUE_INITS)}")
    if ppo.iterations < 1 or ppo.epochs < 1:
        raise ConfigError(f"ppo.iterations {ppo.iterations} and ppo.epochs {ppo.epochs} must be at least 1")
    if ppo.rollouts < batch or ppo.rollouts % batch:
        raise ConfigError(f"ppo.rollouts {ppo.rollouts} is not a multiple of the mini-batch, train.global_batch_size "
                          f"{batch}; make it one (the paper: 512 rollouts, mini-batches of 64)")
    if ppo.max_new_tokens < 1 or ppo.temperature <= 0:
        raise ConfigError(f"ppo.max_new_tokens {ppo.max_new_tokens} must be at least 1 and ppo.temperature "
                          f"{ppo.temperature} above 0 (PPO samples)")
    if not 0 < ppo.clip < 1 or ppo.value_clip <= 0:
        raise ConfigError(f"ppo.clip {ppo.clip} must be in (0, 1) and ppo.value_clip {ppo.value_clip} above 0")
    if not (0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1):
        raise ConfigError(f"ppo.gamma {ppo.gamma} and ppo.lam {ppo.lam} must be in [0, 1]")
    if ppo.kl_coef < 0 or ppo.value_lr <= 0:
        raise ConfigError(f"ppo.kl_coef {ppo.kl_coef} must be >= 0 and ppo.value_lr {ppo.value_lr} above 0")


def set_steps(config: ml_collections.ConfigDict) -> None:
    """train.steps from the iterations; one log line per iteration."""
    per_iteration = config.ppo.rollouts // config.train.global_batch_size * config.ppo.epochs
    config.train.steps = config.ppo.iterations * per_iteration
    config.train.log_every = per_iteration


def check_value_model(config: ml_collections.ConfigDict) -> None:
    """The value model's start has the policy's shape (the two train as one actor-critic)."""
    if config.ppo.value_init != "helpfulness_rm":
        return
    value, _ = checkpoint_config(config.ppo.helpfulness_rm)
    policy = model_config_from(config)
    differ = [f"{field} {getattr(value, field)} (policy: {getattr(policy, field)})" for field in SHAPE_FIELDS
              if getattr(value, field) != getattr(policy, field)]
    if differ:
        raise ValueError(f"the value model cannot start from ppo.helpfulness_rm {config.ppo.helpfulness_rm}: it "
                         f"differs from the policy in {', '.join(differ)}; set --config.ppo.value_init=policy")


def check_memory(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> dict[str, float]:
    """What one device holds of the models (memory_per_device) against its memory; a clear error
    naming what to change when they do not fit. Activations and the KV cache come on top."""
    needed = memory_per_device(model_config_from(config), config.ppo.frozen_dtype, mesh, rules,
                               value_shares_helpfulness_base=config.ppo.value_init == "helpfulness_rm")
    available = config.ppo.device_memory_gib * GIB or _device_memory()
    if available and needed["total"] > available:
        parts = ", ".join(f"{name} {value / GIB:.1f} GiB" for name, value in needed.items() if name != "total")
        raise ValueError(f"PPO's models need {needed['total'] / GIB:.1f} GiB per device ({parts}) but a device "
                         f"has {available / GIB:.1f} GiB; shard them over more devices (--config.mesh.ici_fsdp) or "
                         "use a smaller model")
    return needed


GIB = float(2**30)


def memory_per_device(model_config, frozen_dtype: str, mesh: Mesh, rules,
                      value_shares_helpfulness_base: bool = True) -> dict[str, float]:
    """Bytes one device holds, from the parameters' shards under `rules`: what the policy and the
    value model train (float32 weights, two AdamW moments and a gradient: 16 bytes a parameter), their
    frozen bases when they train adapters (as stored: the base dtype, or int8/int4 levels and their
    scales), the frozen models (in frozen_dtype: the reference, unless the policy's base is it, and
    the reward models, the helpfulness one unless the value model's base is it) and the rollout's
    copy of the policy in the decoding layout (compute dtype, not sharded over fsdp)."""
    from llama2_jax.model.llama import Llama, LlamaRewardModel
    from llama2_jax.train.state import split_model

    def shard_bytes(state, bytes_per_parameter: float | None, layout_rules) -> float:
        """Bytes a device holds of `state`, each parameter `bytes_per_parameter` (None: as stored,
        an int4 level half a byte)."""
        shardings = sharding.state_shardings(state, mesh, layout_rules)
        leaves = zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
        return sum(math.prod(where.shard_shape(leaf.shape)) * (bytes_per_parameter or stored_bits(leaf.dtype) / 8)
                   for leaf, where in leaves)

    def parts_of(model_class, config):
        _, trained, frozen = split_model(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))), config)
        return trained, frozen

    plain = model_config.without_adapters()
    frozen = np.dtype(frozen_dtype).itemsize
    trained = [parts_of(model_class, model_config) for model_class in (Llama, LlamaRewardModel)]
    adapters = bool(model_config.lora_rank)
    frozen_models = [Llama] * (not adapters) + [LlamaRewardModel] * (2 - (adapters and value_shares_helpfulness_base))
    parts = {
        "trained": sum(shard_bytes(part, 16, rules) for part, _ in trained),
        "bases": sum(shard_bytes(part, None, rules) for _, part in trained),
        "frozen": sum(shard_bytes(parts_of(model_class, plain)[0], frozen, rules) for model_class in frozen_models),
        "decoding": shard_bytes(parts_of(Llama, plain)[0], np.dtype(model_config.compute_dtype).itemsize,
                                sharding.generation_rules(rules)),
    }
    return {**parts, "total": sum(parts.values())}


def _device_memory() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 0))


def rollout_prompts(config: ml_collections.ConfigDict, tokenizer: Tokenizer, section: str,
                    context: int) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts and the held-out ones (None without evaluations) of an on-policy stage
    whose `section` (ppo, grpo) sets `max_new_tokens` and `eval_prompts`: those that leave room for an
    answer in `context` and train.seq_len, the others skipped and counted."""
    settings = config[section]
    budget = min(context - CUT_ANSWER_EOS, config.train.seq_len) - settings.max_new_tokens
    if budget < 1:
        raise ConfigError(f"train.seq_len {config.train.seq_len} leaves no room for a prompt before "
                          f"{section}.max_new_tokens {settings.max_new_tokens}; raise it or lower "
                          f"{section}.max_new_tokens")
    training = encode_prompts(split_prompts(config.data, config.data.train_split), tokenizer, budget)
    if not training.indices:
        raise ValueError(f"none of the {len(training.prompts)} training prompts fits in {budget} tokens; give shorter "
                         "prompts or raise train.seq_len")
    held_out = None
    if settings.eval_prompts and config.train.eval_every:
        held_out = encode_prompts(split_prompts(config.data, config.data.eval_split)[:settings.eval_prompts],
                                  tokenizer, budget)
        held_out = held_out if held_out.indices else None
    return training, held_out


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """PPO as `config` says in `workdir`, resuming from the newest checkpoint there."""
    check_config(config)
    tokenizer = start_from_checkpoint(config, kind="llama")
    ppo = config.ppo
    context = check_models_of(config, tokenizer, {"ppo.helpfulness_rm": (ppo.helpfulness_rm, "reward"),
                                                  "ppo.safety_rm": (ppo.safety_rm, "reward")},
                              "ppo.max_new_tokens", ppo.max_new_tokens)
    check_value_model(config)
    training, held_out = rollout_prompts(config, tokenizer, "ppo", context)
    set_steps(config)
    mesh = sharding.make_mesh(config.mesh)
    needed = check_memory(config, mesh, tuple(tuple(rule) for rule in config.rules))
    _print(f"PPO: {ppo.iterations} iterations of {ppo.rollouts} rollouts from {len(training.indices)} training "
           f"prompts ({training.skipped} too long, skipped), {config.train.steps} optimizer steps; "
           f"{needed['total'] / GIB:.2f} GiB of weights and optimizer state per device")
    train_dir = _train_dir(workdir)
    stopped_early = storage.as_path(train_dir) / EARLY_STOP_FILE
    if stopped_early.exists():  # the run ended there: what is left is the export
        config.optimizer.decay_steps = config.optimizer.decay_steps or config.train.steps
        config.train.steps = json.loads(stopped_early.read_text())["step"]
    result = train(config, train_dir, make_task(config, tokenizer, training, held_out, workdir))
    if result.interrupted:
        return result
    if result.early_stopped and jax.process_index() == 0:
        stopped_early.write_text(json.dumps({"step": int(result.state.step), "why": result.early_stopped}))
    rejection_files.export_policy(workdir, int(result.state.step), result.model().policy, tokenizer.path)
    _print(f"the trained policy is in {workdir} (python -m llama2_jax chat --checkpoint {workdir})")
    draw(train_dir)
    return result


def draw(train_dir: str) -> None:
    """ppo.png, the iterations' metrics, beside the loop's own figures; a warning when it cannot be drawn."""
    from llama2_jax.cli import draw_figures

    draw_figures(train_dir)
    if jax.process_index() == 0:
        try:
            log.info("drew %s", plots.ppo_figure(train_dir))
        except (OSError, ValueError) as error:
            log.warning("could not draw ppo.png: %s", error)


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
