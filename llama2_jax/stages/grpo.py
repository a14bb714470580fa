"""GRPO (Shao et al. 2024, DeepSeekMath; not in the Llama 2 paper): PPO without a value model, each
prompt answered by a group of G samples whose rewards, relative to the group's, are the advantages.

    python -m llama2_jax grpo --config=configs/grpo.py:tiny --workdir=runs/grpo
    python -m llama2_jax grpo --config=configs/grpo.py:tiny,instructions --workdir=runs/grpo_instructions

An algorithm of the on-policy stage (llama2_jax/stages/on_policy.py). A reward is the combination of
the helpfulness and safety reward models (`reward.combine`), or a program's: `grpo.reward_fn=
"module:function"`, called as `function(prompt_messages, answer_text) -> float`.

    advantage  per group: A_i = (r_i - mean(r)) / (std(r) + 1e-6) (`grpo.scale_rewards`; else
               r_i - mean(r)), the same on every token of answer i
    loss       the clipped policy loss + beta k3 KL to the reference (llama2_jax/train/grpo_loss.py)
"""

from __future__ import annotations

import functools
import ml_collections
import numpy as np

from llama2_jax.stages import on_policy
from llama2_jax.train import grpo_loss

STAGE = "grpo"
OWN_DOCS = {
    "grpo.group_size": "G, answers sampled per prompt, whose rewards are compared with one another (at least 2)",
    "grpo.kl_coef": "beta, the weight of the k3 KL to the reference in the loss",
    "grpo.scale_rewards": "divide each group's centred rewards by its standard deviation (+1e-6)",
}


def advantages(rollout: on_policy.Rollout, grpo: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """Each answer's reward relative to its group's, on every one of its tokens."""
    advantage = grpo_loss.group_advantages(rollout.rewards, rollout.groups, grpo.scale_rewards)
    spreads = np.array([rollout.rewards[rollout.groups == group].std() for group in np.unique(rollout.groups)])
    return {"advantages": advantage[:, None] * rollout.mask}, {
        "reward_group_std": float(np.mean(spreads)),
        "groups_all_equal": float(np.mean(spreads == 0)),  # groups that teach nothing: advantage 0
    }


ALGORITHM = on_policy.Algorithm(
    name="grpo", title="GRPO", config_docs=OWN_DOCS, advantages=advantages,
    loss=lambda grpo: grpo_loss.make_grpo_loss(clip=grpo.clip, kl_coef=grpo.kl_coef),
    float_fields=grpo_loss.FLOAT_FIELDS, min_group_size=2)
CONFIG_DOCS = on_policy.config_docs(ALGORITHM)

make_task = functools.partial(on_policy.make_task, ALGORITHM)  # (config, ...) -> its Task
run = functools.partial(on_policy.run, ALGORITHM)  # (config, workdir): what its command does
