"""DPO's loss (Rafailov et al. 2023) on preference pairs, with the paper's rating margins carried over.

    h = beta * [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))]
    sigmoid:  -log σ(h - m(rating))
    ipo:      (h / beta - 1 / (2 beta))^2        (Azar et al. 2023; no margin)

log pi(y) is the sum of the answer's token log-probs (its EOS included) given the prompt; the
reference's come with the batch (`reference_chosen`, `reference_rejected`, computed by the frozen
reference: llama2_jax/stages/dpo.py). `m` is the reward stage's margin table (none, small, large),
so a "significantly better" pair pushes harder, as it does for the reward models; unrated pairs get 0.
beta * (log pi - log pi_ref) is DPO's implicit reward: its accuracy (chosen above rejected) is
counted overall, per rating level and per safety bin, as the reward models' is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama2_jax.model import axes
from llama2_jax.train.losses import Batch, LossFn, cross_entropy_terms
from llama2_jax.train.preference_loss import MARGINS, margins, preference_sums

LOSSES = ("sigmoid", "ipo")


def answer_log_probs(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """log pi of the chosen and of the rejected answer of each pair, `[B]` each: the model runs on the
    2B sequences as one batch, and each sums its answer's token log-probs (`answer_mask`)."""
    pairs, _, length = batch["inputs"].shape

    def sequences(name: str) -> jax.Array:
        return axes.constrain(batch[name].reshape(2 * pairs, length), (axes.BATCH, axes.LENGTH))

    inputs = sequences("inputs")
    logits = model(inputs, positions=sequences("positions"), segment_ids=sequences("segment_ids"))
    targets = jnp.concatenate([inputs[:, 1:], jnp.zeros_like(inputs[:, :1])], axis=1)
    log_z, target_logit = cross_entropy_terms(logits, targets)
    mask = batch["answer_mask"].reshape(2 * pairs, length).astype(jnp.float32)
    sums = jnp.sum(mask * (target_logit - log_z), axis=-1).reshape(pairs, 2)
    return sums[:, 0], sums[:, 1]


def make_dpo_loss(*, beta: float, loss: str = "sigmoid", margin: str = "none") -> LossFn:
    """The DPO (or IPO) loss over batches of pairs with the reference's log-probs; `weight` counts pairs.
    Sums beside it: the implicit rewards' accuracy (overall, per level, per safety bin), the chosen
    and rejected log-probs, the implicit rewards and their margin."""
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if margin not in MARGINS:
        raise ValueError(f"unknown margin {margin!r}; choose one of {', '.join(MARGINS)}")

    def dpo_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        weight = batch["pair_weight"].astype(jnp.float32)
        chosen, rejected = answer_log_probs(model, batch)
        chosen_reward = beta * (chosen - batch["reference_chosen"])
        rejected_reward = beta * (rejected - batch["reference_rejected"])
        h = chosen_reward - rejected_reward
        if loss == "sigmoid":
            per_pair = -jax.nn.log_sigmoid(h - margins(batch["rating"], margin))
        else:
            per_pair = jnp.square(h / beta - 1 / (2 * beta))
        # Rows of padding hold no answer: their log-probs are 0, and their weight keeps them out.
        loss_sum = jnp.sum(weight * per_pair)
        sums = preference_sums(jax.lax.stop_gradient(chosen_reward), jax.lax.stop_gradient(rejected_reward), batch)
        for name in [name for name in sums if "histogram" in name or name.startswith("unsafe_recall")]:
            del sums[name]  # about σ(score) of a reward model, which an implicit reward is not
        sums.update(chosen_log_prob=jnp.sum(weight * jax.lax.stop_gradient(chosen)),
                    rejected_log_prob=jnp.sum(weight * jax.lax.stop_gradient(rejected)))
        sums["chosen_reward"], sums["rejected_reward"] = sums.pop("chosen_score"), sums.pop("rejected_score")
        sums["reward_margin"] = sums.pop("score_margin")
        return loss_sum, sums

    return dpo_loss
