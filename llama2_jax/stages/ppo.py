"""PPO, the paper's second RLHF stage (§3.2.3): the policy trained on its own answers, rewarded by the
helpfulness and safety reward models and held near the policy it started from.

    python -m llama2_jax ppo --config=configs/ppo.py:tiny --workdir=runs/ppo
    python -m llama2_jax ppo --config=configs/ppo.py:7b --config.init_checkpoint=runs/rejection-7b \
        --config.ppo.helpfulness_rm=runs/rm-h-7b --config.ppo.safety_rm=runs/rm-s-7b --workdir=/data/runs/ppo-7b

An algorithm of the on-policy stage (llama2_jax/stages/on_policy.py: the loop, resume, evaluation,
export). The run holds five models on one mesh: the policy and the value model, trained together
(`ActorCritic`, each with an AdamW of its own: `optimizer.peak_lr` and `ppo.value_lr`), and three
frozen ones: the reference policy, which the KL term holds the policy near, and the two reward models.
With `lora.rank` > 0 the policy and the value model train adapters on frozen bases; the policy's
base, adapters off, is the reference, and the value model's base (the helpfulness RM's, with
`ppo.value_init` helpfulness_rm) under the RM's own head is the helpfulness RM: three bases.

    advantage  WHITEN(LOGIT(R_c)) - missing_eos_penalty on the last answer token, - beta KL on every
               one, then GAE with the value model's values; advantages whitened
               (llama2_jax/train/ppo_loss.py)
    loss       the clipped policy loss and the clipped value loss
"""

from __future__ import annotations

import functools
import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import plots, sharding
from llama2_jax.checkpoint.load import checkpoint_config
from llama2_jax.errors import ConfigError
from llama2_jax.model.llama import ActorCritic
from llama2_jax.model.quantize import stored_bits
from llama2_jax.stages import on_policy
from llama2_jax.stages.initial import SHAPE_FIELDS, load_initial_model
from llama2_jax.train import ppo_loss
from llama2_jax.train.config import model_config_from

STAGE = "ppo"
OWN_DOCS = {
    "ppo.value_init": "where the value model starts: helpfulness_rm, or policy (its backbone, a new head)",
    "ppo.value_lr": "the value model's constant learning rate (the policy's: optimizer.peak_lr)",
    "ppo.kl_coef": "beta, the weight of the per-token KL to the reference in the reward",
    "ppo.value_clip": "how far a value may move from the rollout's before its loss is clipped",
    "ppo.gamma": "GAE discount",
    "ppo.lam": "GAE lambda",
    "ppo.missing_eos_penalty": "subtracted from the whitened score of an answer cut off before EOS",
    "ppo.device_memory_gib": "memory of one device for the pre-flight check (0: what the device reports)",
}
VALUE_INITS = ("helpfulness_rm", "policy")
GIB = float(2**30)


def advantages(rollout: on_policy.Rollout, ppo: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """GAE over the KL-penalised per-token rewards, whitened; the returns the value model learns."""
    scores = ppo_loss.whiten(ppo_loss.logit(rollout.rewards)) - ppo.missing_eos_penalty * ~rollout.finished
    token_rewards = ppo_loss.token_rewards(scores, rollout.kl, rollout.mask, ppo.kl_coef)
    gae, returns = ppo_loss.gae(token_rewards, rollout.values, rollout.mask, ppo.gamma, ppo.lam)
    return {"advantages": ppo_loss.whiten(gae, rollout.mask), "returns": returns}, {}


def check(config: ml_collections.ConfigDict) -> None:
    """One ConfigError naming the key for a value of PPO's own keys the stage cannot use."""
    ppo = config.ppo
    if ppo.value_init not in VALUE_INITS:
        raise ConfigError(f"ppo.value_init is {ppo.value_init!r}; choose one of {', '.join(VALUE_INITS)}")
    if ppo.value_clip <= 0 or ppo.value_lr <= 0:
        raise ConfigError(f"ppo.value_clip {ppo.value_clip} and ppo.value_lr {ppo.value_lr} must be above 0")
    if not (0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1):
        raise ConfigError(f"ppo.gamma {ppo.gamma} and ppo.lam {ppo.lam} must be in [0, 1]")


def before_training(config: ml_collections.ConfigDict) -> str:
    """The value model's start checked against the policy, and the models against a device's memory."""
    check_value_model(config)
    needed = check_memory(config, sharding.make_mesh(config.mesh), tuple(tuple(rule) for rule in config.rules))
    return f"; {needed['total'] / GIB:.2f} GiB of weights and optimizer state per device"


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


ALGORITHM = on_policy.Algorithm(
    name="ppo", title="PPO", config_docs=OWN_DOCS, advantages=advantages,
    loss=lambda ppo: ppo_loss.make_ppo_loss(clip=ppo.clip, value_clip=ppo.value_clip),
    float_fields=ppo_loss.FLOAT_FIELDS, check=check, min_group_size=0, value_model=True,
    initial_model=initial_actor_critic, before_training=before_training,
    peak_lrs=lambda config: {"policy": config.optimizer.peak_lr, "value": config.ppo.value_lr},
    figure=plots.ppo_figure)
CONFIG_DOCS = on_policy.config_docs(ALGORITHM)

make_task = functools.partial(on_policy.make_task, ALGORITHM)  # (config, ...) -> its Task
run = functools.partial(on_policy.run, ALGORITHM)  # (config, workdir): what its command does
