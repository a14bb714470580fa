"""GRPO's arithmetic (Shao et al. 2024, DeepSeekMath §4.1): group-relative advantages on the host and
the clipped loss with a k3 KL term on the devices. No value model.

    advantage  per group of G answers to one prompt: A_i = (r_i - mean(r)) / (std(r) + 1e-6), or
               r_i - mean(r) without scaling; the same A_i on every token of answer i
    loss       per answer token: max(-A r, -A clip(r, 1-eps, 1+eps)) + beta k3,
               r = pi / pi_old,  k3 = exp(ref - log pi) - (ref - log pi) - 1

std is the population standard deviation of the group (ddof 0). The loss is summed over answer
tokens and `weight` counts them (llama2_jax/train/losses.py), so every token of a batch weighs the
same, where DeepSeekMath averages each answer's tokens first; k3 is taken at the current policy,
with the gradient through it, as DeepSeekMath's objective has it. Token arrays are in PPO's
training-row coordinates (llama2_jax/train/ppo_loss.py): entry t is about the token at t + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama2_jax.train.losses import Batch
from llama2_jax.train.ppo_loss import clipped_policy_loss

# Added to a group's standard deviation: a group whose answers all scored the same gets advantage 0.
STD_EPS = 1e-6

# Training rows: PPO's integer fields (ppo_loss.INT_FIELDS), `answer_mask` (float, the loss weight) and the rollout's
# `old_log_probs`, `reference_log_probs` and `advantages`.
FLOAT_FIELDS = ("answer_mask", "old_log_probs", "reference_log_probs", "advantages")


def group_advantages(rewards: np.ndarray, groups: np.ndarray, scale: bool = True) -> np.ndarray:
    """Each answer's reward less its group's mean, divided by the group's std + 1e-6 when `scale`;
    `groups[i]` names answer i's group (its prompt)."""
    rewards, groups = np.asarray(rewards, np.float64), np.asarray(groups)
    advantages = np.zeros_like(rewards)
    for group in np.unique(groups):
        members = groups == group
        centred = rewards[members] - rewards[members].mean()
        advantages[members] = centred / (rewards[members].std() + STD_EPS) if scale else centred
    return advantages.astype(np.float32)


def make_grpo_loss(*, clip: float, kl_coef: float):
    """GRPO's loss on a `Llama` and a batch of training rows (see the module docstring), summed over
    answer tokens; `weight` counts them. Sums beside the loss: the policy loss, the KL to the
    reference (k3), the share of tokens whose ratio was clipped, the approximate KL between the old
    and the new policy (k3), the policy's entropy, and the mean ratio."""

    def grpo_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        log_probs, policy_sum, sums = clipped_policy_loss(logits, batch, clip)
        # Masked before the exponential: outside the answers the reference is stored as 0 and a
        # padding target's log-prob may be -100, whose exp overflows (a NaN gradient even if masked after).
        answer = batch["answer_mask"] > 0
        to_reference = jnp.where(answer, batch["reference_log_probs"] - log_probs, 0.0)
        kl_sum = jnp.sum(batch["answer_mask"].astype(jnp.float32) * (jnp.expm1(to_reference) - to_reference))  # k3
        sums["kl"] = jax.lax.stop_gradient(kl_sum)
        return policy_sum + kl_coef * kl_sum, sums

    return grpo_loss
