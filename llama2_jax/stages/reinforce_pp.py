"""REINFORCE++ (Hu 2025; not in the Llama 2 paper): PPO's token-level KL penalty and clipped loss
without a value model, the advantages normalised over the whole batch rather than per prompt.

    python -m llama2_jax reinforce_pp --config=configs/reinforce_pp.py:tiny --workdir=runs/reinforce_pp

An algorithm of the on-policy stage (llama2_jax/stages/on_policy.py), with GRPO's keys.

    reward     r_t = -beta (log pi - log pi_ref) on every answer token, + R on the last one
    advantage  the return G_t = sum_{s >= t} r_s (no discount), then (G - mean) / std over every
               answer token of the rollout
    loss       the clipped policy loss (GRPO's, without its k3 term: the KL is in the reward)
"""

from __future__ import annotations

import functools
import ml_collections
import numpy as np

from llama2_jax.stages import on_policy
from llama2_jax.train import grpo_loss, ppo_loss

STAGE = "reinforce_pp"
OWN_DOCS = {
    "reinforce_pp.group_size": "answers sampled per prompt (1: one, as REINFORCE++ samples; the advantages are "
                               "normalised over the batch whatever it is)",
    "reinforce_pp.kl_coef": "beta, the weight of the per-token KL to the reference in the reward",
}


def advantages(rollout: on_policy.Rollout, section: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """The returns of the KL-penalised per-token rewards, normalised over the rollout's answer tokens."""
    token_rewards = ppo_loss.token_rewards(rollout.rewards, rollout.kl, rollout.mask, section.kl_coef)
    returns, _ = ppo_loss.gae(token_rewards, np.zeros_like(token_rewards), rollout.mask, 1.0, 1.0)
    return {"advantages": ppo_loss.whiten(returns, rollout.mask)}, {}


ALGORITHM = on_policy.Algorithm(
    name="reinforce_pp", title="REINFORCE++", config_docs=OWN_DOCS, advantages=advantages,
    loss=lambda section: grpo_loss.make_grpo_loss(clip=section.clip, kl_coef=0.0),
    float_fields=grpo_loss.FLOAT_FIELDS, min_group_size=1)
CONFIG_DOCS = on_policy.config_docs(ALGORITHM)

make_task = functools.partial(on_policy.make_task, ALGORITHM)  # (config, ...) -> its Task
run = functools.partial(on_policy.run, ALGORITHM)  # (config, workdir): what its command does
