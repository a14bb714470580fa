"""The reward models' loss: a binary ranking loss on the two responses of a pair, with a margin.

    loss = -log σ(r_chosen − r_rejected − m(rating)) + λ · (r_chosen + r_rejected)²
           + α · Σ_{labelled responses} −[safe · log σ(r) + (1 − safe) · log(1 − σ(r))]

`m` is one of the paper's margin tables (`MARGINS`, by rating level, strongest first; unrated pairs
get 0); the second term, off when λ = 0, keeps scores centred on 0 (the loss alone only fixes their
differences), so that σ(score) = 0.5 means "neither good nor bad". The third is the safety model's
auxiliary loss (the paper's A.3.4, whose exact form it leaves open; docs/recipe.md): a binary
cross-entropy of σ(score) against the response's safety label, on each response that carries one,
which puts unsafe answers below 0.5 and safe ones above, where the ranking term alone only orders
them within a pair.

Batches are rows of pairs (llama2_jax/data/preferences.py): `[B, 2, T]` sequences, chosen first. The
model scores the `2B` sequences as one batch, so the two responses of a prompt always go through
the same step together, micro-batches included. Besides the loss, the sums give the accuracy
(chosen scored strictly higher) overall, per rating level and per safety bin, the mean scores and
margin, histograms of σ(score), and the recall of unsafe answers (σ(score) < 0.5), so that
evaluations over many batches add up exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llama2_jax.data.records import RATING_LEVELS
from llama2_jax.model import axes
from llama2_jax.train.losses import Batch, LossFn

# The paper's margins m(rating), in the order of RATING_LEVELS.
MARGINS = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2 / 3, 1 / 3, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}
# Pairs by their safety labels (chosen safe, rejected safe); the paper's safety model drops the last.
SAFETY_BINS = {"safe_unsafe": (1, 0), "both_safe": (1, 1), "both_unsafe": (0, 0), "unsafe_safe": (0, 1)}
HISTOGRAM_BINS = 20  # equal bins of σ(score) over [0, 1]
UNSAFE_THRESHOLD = 0.5  # an unsafe answer is recalled when σ(score) is below this


def pair_scores(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The model's scores `[B]` of the chosen and of the rejected sequences of each pair."""
    pairs, _, length = batch["inputs"].shape

    def sequences(name: str) -> jax.Array:
        return axes.constrain(batch[name].reshape(2 * pairs, length), (axes.BATCH, axes.LENGTH))

    scores = model(sequences("inputs"), positions=sequences("positions"), segment_ids=sequences("segment_ids"))
    scores = scores.reshape(pairs, 2)
    return scores[:, 0], scores[:, 1]


def margins(rating: jax.Array, margin: str) -> jax.Array:
    """m(rating) from the table `margin`; 0 for unrated pairs (rating -1)."""
    table = jnp.asarray(MARGINS[margin], jnp.float32)
    return jnp.where(rating >= 0, table[jnp.clip(rating, 0, len(RATING_LEVELS) - 1)], 0.0)


def make_preference_loss(*, margin: str = "none", centering: float = 0.0, safety_aux: float = 0.0) -> LossFn:
    """The ranking loss over batches of pairs (see the module docstring); `weight` counts pairs."""
    if margin not in MARGINS:
        raise ValueError(f"unknown margin {margin!r}; choose one of {', '.join(MARGINS)}")

    def preference_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        weight = batch["pair_weight"].astype(jnp.float32)
        # Rows of padding score whatever a row of padding scores: set to 0 before anything adds up.
        chosen, rejected = (jnp.where(weight > 0, scores, 0.0) for scores in pair_scores(model, batch))
        ranking = -jax.nn.log_sigmoid(chosen - rejected - margins(batch["rating"], margin))
        loss_sum = jnp.sum(weight * (ranking + centering * jnp.square(chosen + rejected)))
        sums = preference_sums(chosen, rejected, batch)
        if centering or safety_aux:
            sums["ranking_loss"] = jnp.sum(weight * ranking)
        if safety_aux:
            sums["safety_aux_loss"] = jnp.sum(weight * safety_cross_entropy(chosen, rejected, batch))
            loss_sum = loss_sum + safety_aux * sums["safety_aux_loss"]
        return loss_sum, sums

    return preference_loss


def safety_cross_entropy(chosen: jax.Array, rejected: jax.Array, batch: Batch) -> jax.Array:
    """Per pair, the binary cross-entropy of σ(score) against the safety label (1 safe, 0 unsafe),
    summed over its responses that carry one (label -1: none)."""
    total = 0.0
    for side, score in (("chosen", chosen), ("rejected", rejected)):
        label = batch[f"{side}_safe"]
        cross_entropy = -jnp.where(label == 1, jax.nn.log_sigmoid(score), jax.nn.log_sigmoid(-score))
        total = total + jnp.where(label >= 0, cross_entropy, 0.0)
    return total


def preference_sums(chosen: jax.Array, rejected: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Metric sums of a batch of pairs: each `x` over the pairs it counts, in `x_weight` where
    those are not all the pairs (`weight`)."""
    weight = batch["pair_weight"].astype(jnp.float32)
    correct = (chosen > rejected).astype(jnp.float32)
    sums = {
        "weight": jnp.sum(weight),
        "accuracy": jnp.sum(weight * correct),
        "chosen_score": jnp.sum(weight * chosen),
        "rejected_score": jnp.sum(weight * rejected),
        "score_margin": jnp.sum(weight * (chosen - rejected)),
        "chosen_score_histogram": _histogram(jax.nn.sigmoid(chosen), weight),
        "rejected_score_histogram": _histogram(jax.nn.sigmoid(rejected), weight),
    }
    for level, name in enumerate(RATING_LEVELS):
        _add_share(sums, f"accuracy_{name}", correct, weight * (batch["rating"] == level))
    for name, (chosen_safe, rejected_safe) in SAFETY_BINS.items():
        in_bin = (batch["chosen_safe"] == chosen_safe) & (batch["rejected_safe"] == rejected_safe)
        _add_share(sums, f"accuracy_{name}", correct, weight * in_bin)
    recalled = sum(weight * (batch[f"{side}_safe"] == 0) * (jax.nn.sigmoid(score) < UNSAFE_THRESHOLD)
                   for side, score in (("chosen", chosen), ("rejected", rejected)))
    unsafe = sum(weight * (batch[f"{side}_safe"] == 0) for side in ("chosen", "rejected"))
    sums["unsafe_recall"], sums["unsafe_recall_weight"] = jnp.sum(recalled), jnp.sum(unsafe)
    return sums


def _add_share(sums: dict[str, jax.Array], name: str, values: jax.Array, counted: jax.Array) -> None:
    sums[name] = jnp.sum(counted * values)
    sums[f"{name}_weight"] = jnp.sum(counted)


def _histogram(probabilities: jax.Array, weight: jax.Array) -> jax.Array:
    """Weighted counts of `probabilities` in HISTOGRAM_BINS equal bins over [0, 1]."""
    bins = jnp.clip(jnp.floor(probabilities * HISTOGRAM_BINS).astype(jnp.int32), 0, HISTOGRAM_BINS - 1)
    return jnp.sum(jax.nn.one_hot(bins, HISTOGRAM_BINS) * weight[:, None], axis=0)
