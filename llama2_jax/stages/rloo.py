"""RLOO (Ahmadian et al. 2024, "Back to Basics"; not in the Llama 2 paper): REINFORCE with K answers
per prompt, each answer's baseline the mean reward of the other K - 1.

    python -m llama2_jax rloo --config=configs/rloo.py:tiny --workdir=runs/rloo

An algorithm of the on-policy stage (llama2_jax/stages/on_policy.py), with GRPO's keys.

    reward     r_i = R_i - beta sum_t (log pi - log pi_ref), the KL of the whole answer in its reward
    advantage  A_i = r_i - (sum_j r_j - r_i) / (K - 1), on every token of answer i
    loss       the clipped policy loss (GRPO's, without its k3 term: the KL is in the reward)
"""

from __future__ import annotations

import functools
import ml_collections
import numpy as np

from llama2_jax.stages import on_policy
from llama2_jax.train import grpo_loss

STAGE = "rloo"
OWN_DOCS = {
    "rloo.group_size": "K, answers sampled per prompt; each one's baseline is the mean of the others' (at least 2)",
    "rloo.kl_coef": "beta, the weight of each answer's KL to the reference (summed over its tokens) in its reward",
}


def leave_one_out_baselines(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each reward's baseline: the mean of the other rewards of its group (`groups[i]`: answer i's)."""
    rewards, groups = np.asarray(rewards, np.float64), np.asarray(groups)
    baselines = np.zeros_like(rewards)
    for group in np.unique(groups):
        members = groups == group
        baselines[members] = (rewards[members].sum() - rewards[members]) / (members.sum() - 1)
    return baselines


def advantages(rollout: on_policy.Rollout, rloo: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """Each answer's KL-penalised reward less its leave-one-out baseline, on every one of its tokens."""
    rewards = rollout.rewards - rloo.kl_coef * rollout.kl.sum(axis=1)
    advantage = (rewards - leave_one_out_baselines(rewards, rollout.groups)).astype(np.float32)
    return {"advantages": advantage[:, None] * rollout.mask}, {"reward_with_kl": float(np.mean(rewards))}


ALGORITHM = on_policy.Algorithm(
    name="rloo", title="RLOO", config_docs=OWN_DOCS, advantages=advantages,
    loss=lambda rloo: grpo_loss.make_grpo_loss(clip=rloo.clip, kl_coef=0.0),
    float_fields=grpo_loss.FLOAT_FIELDS, min_group_size=2)
CONFIG_DOCS = on_policy.config_docs(ALGORITHM)

make_task = functools.partial(on_policy.make_task, ALGORITHM)  # (config, ...) -> its Task
run = functools.partial(on_policy.run, ALGORITHM)  # (config, workdir): what its command does
