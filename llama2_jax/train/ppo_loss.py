"""PPO's arithmetic (the paper's §3.2.3): from reward-model scores to per-token advantages on the
host, and the clipped losses on the devices.

    score     R_c = combine(R_h, R_s)        at the answer's last token (llama2_jax.reward.combine)
    reward    WHITEN(LOGIT(R_c)) - beta * KL  per answer token: the whitened score on the last one,
              KL = log pi(y_t) - log pi_ref(y_t) on every one
    GAE       delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  V after the
              answer's end = 0; returns A_t + V_t; advantages whitened over the global batch's tokens
    loss      policy: max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old
              value:  1/2 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)

Token arrays are `[rollouts, length]` in the training rows' coordinates: entry t is about the token
at t + 1 (the policy's prediction there, and the value of the text up to t); `mask` is 1 where that
token is an answer token (EOS included), one contiguous run per row. The policy and the value model
have optimizers of their own, so the value loss is added to the policy loss with no coefficient:
AdamW's steps do not depend on a gradient's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama2_jax.train.losses import Batch, cross_entropy_terms

# Scores this close to 0 or 1 are clipped before LOGIT, which is infinite at either end.
LOGIT_EPS = 1e-6

# Training rows: `inputs` and `targets` (inputs shifted by one), `positions`, `segment_ids`,
# `answer_mask` (float, the loss weight) and the rollout's `old_log_probs`, `old_values`,
# `advantages` and `returns`.
FLOAT_FIELDS = ("answer_mask", "old_log_probs", "old_values", "advantages", "returns")
INT_FIELDS = ("inputs", "targets", "positions", "segment_ids")


def logit(p: np.ndarray, eps: float = LOGIT_EPS) -> np.ndarray:
    """The inverse of the sigmoid, log(p / (1 - p)), with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def whiten(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std over the entries where `mask` is 1 (all of them without one); 0 elsewhere."""
    x = np.asarray(x, np.float64)
    mask = np.ones_like(x) if mask is None else np.asarray(mask, np.float64)
    count = max(mask.sum(), 1.0)
    mean = (x * mask).sum() / count
    std = np.sqrt((np.square(x - mean) * mask).sum() / count)
    return ((x - mean) / (std + 1e-8) * mask).astype(np.float32)


def kl_estimates(log_probs: np.ndarray, ref_log_probs: np.ndarray,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two per-token estimates of KL(pi || pi_ref) from tokens sampled from pi: k1 = log pi - log pi_ref
    (unbiased, the one in the reward) and k3 = exp(-k1) - 1 + k1 (unbiased and never negative); 0
    where `mask` is 0, whose log-probs (a padding target's may be -100) never reach the exponential."""
    k1 = np.asarray(log_probs, np.float64) - np.asarray(ref_log_probs, np.float64)
    if mask is not None:
        k1 = np.where(np.asarray(mask) > 0, k1, 0.0)
    return k1.astype(np.float32), (np.expm1(-k1) + k1).astype(np.float32)


def last_answer_index(mask: np.ndarray) -> np.ndarray:
    """Per row, the index of the last entry where `mask` is 1."""
    mask = np.asarray(mask) > 0
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def token_rewards(scores: np.ndarray, kl: np.ndarray, mask: np.ndarray, kl_coef: float) -> np.ndarray:
    """-kl_coef * KL on every answer token, plus each row's score on its last answer token."""
    mask = np.asarray(mask, np.float32)
    rewards = -kl_coef * np.asarray(kl, np.float32) * mask
    rewards[np.arange(len(mask)), last_answer_index(mask)] += np.asarray(scores, np.float32)
    return rewards


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and returns (A + V) on the answer tokens, 0 elsewhere."""
    mask = np.asarray(mask, np.float64)
    rewards, values = np.asarray(rewards, np.float64) * mask, np.asarray(values, np.float64) * mask
    advantages = np.zeros_like(rewards)
    following = np.zeros(len(rewards))  # A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0  # 0 past the answer: masked
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = (delta + gamma * lam * following) * mask[:, t]
        advantages[:, t] = following
    return advantages.astype(np.float32), ((advantages + values) * mask).astype(np.float32)


def clipped_policy_loss(logits: jax.Array, batch: Batch, clip: float) -> tuple[jax.Array, jax.Array, dict]:
    """The clipped policy term PPO and GRPO share, from the policy's logits on a batch of training rows:
    the current log-probs of the targets, the policy loss summed over answer tokens, and the sums of
    what describes the update (`weight`, `policy_loss`, `clip_fraction`, `approx_kl` between the old
    and the new policy (k3), `entropy`, `ratio`)."""
    log_z, target_logit = cross_entropy_terms(logits, batch["targets"])
    log_probs = target_logit - log_z
    mask = batch["answer_mask"].astype(jnp.float32)
    log_ratio = log_probs - batch["old_log_probs"]
    ratio = jnp.exp(log_ratio)
    advantages = batch["advantages"]
    policy_sum = jnp.sum(mask * jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)))
    probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    entropy = jax.lax.stop_gradient(log_z) - jnp.sum(probabilities * jax.lax.stop_gradient(logits), axis=-1)
    log_ratio = jax.lax.stop_gradient(log_ratio)
    sums = {
        "weight": jnp.sum(mask),
        "policy_loss": jax.lax.stop_gradient(policy_sum),
        "clip_fraction": jnp.sum(mask * (jnp.abs(jnp.exp(log_ratio) - 1) > clip)),
        "approx_kl": jnp.sum(mask * (jnp.expm1(log_ratio) - log_ratio)),
        "entropy": jnp.sum(mask * entropy),
        "ratio": jnp.sum(mask * jnp.exp(log_ratio)),
    }
    return log_probs, policy_sum, sums


def make_ppo_loss(*, clip: float, value_clip: float):
    """PPO's loss on an `ActorCritic` and a batch of training rows (see the module docstring), summed
    over answer tokens; `weight` counts them. Sums beside the loss: the policy and value losses,
    the share of tokens whose ratio or value was clipped, the approximate KL between the old and the
    new policy (k3), the policy's entropy, and the mean ratio."""

    def ppo_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        _, policy_sum, sums = clipped_policy_loss(model.policy(batch["inputs"], **inputs), batch, clip)
        values = model.value.token_scores(batch["inputs"], **inputs)
        mask = batch["answer_mask"].astype(jnp.float32)
        old_values, returns = batch["old_values"], batch["returns"]
        clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
        value_loss = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped_values - returns))
        value_sum = jnp.sum(mask * value_loss)
        sums["value_loss"] = jax.lax.stop_gradient(value_sum)
        sums["value_clip_fraction"] = jnp.sum(mask * (jnp.abs(jax.lax.stop_gradient(values) - old_values) > value_clip))
        return policy_sum + value_sum, sums

    return ppo_loss
