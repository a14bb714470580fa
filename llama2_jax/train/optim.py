"""The paper's optimizer: AdamW behind global-norm clipping, on a warmup + cosine schedule.

Llama 2 pretraining (docs/recipe.md): AdamW β1 0.9, β2 0.95, eps 1e-5, weight decay 0.1, gradients clipped
to global norm 1.0, the learning rate warmed up linearly from 0 for 2000 steps and then cosine-decayed
to 10 % of its peak. SFT and the reward models reuse it with their own peak, warmup and length.

Weight decay applies to every parameter except RMSNorm scales (and biases, which Llama has none of
but a task head may): embeddings, attention, MLP and output matrices all decay. The decision is made
by parameter name rather than rank, because the stacked-layer norm scales `[layers, dim]` are 2-D
arrays that are vectors per layer.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

# The paper's pretraining optimizer (docs/recipe.md), in the shape of the config's `optimizer` section.
PAPER_OPTIMIZER = dict(
    peak_lr=3e-4,  # 7B and 13B; 1.5e-4 for 34B and 70B
    end_lr_fraction=0.1,  # cosine decays to this fraction of peak_lr
    warmup_steps=2000,
    warmup_fraction=0.0,  # warmup is at least this share of the schedule (the reward models: 3 %)
    decay_steps=0,  # length of warmup + cosine; 0: the run's length (train.steps)
    b1=0.9,
    b2=0.95,
    eps=1e-5,
    weight_decay=0.1,  # every parameter except norm scales
    clip_norm=1.0,  # global gradient norm
)

# Leaf names of parameters that scale or shift activations elementwise; decaying them towards zero
# would pull the model away from the identity normalisation rather than regularise it.
NO_DECAY_NAMES = ("scale", "bias")


def learning_rate_schedule(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to
    `end_lr_fraction * peak_lr` at `total_steps`, constant after that.

    The value at step s is the learning rate of the update that produces step s + 1.
    """
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        # optax needs a non-empty cosine part; a run shorter than its warmup just ends warm.
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak_lr * end_lr_fraction,
    )


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True where weight decay applies (see module docstring)."""

    def decays(path, _leaf) -> bool:
        name = path[-1]
        name = getattr(name, "key", getattr(name, "name", name))
        return str(name) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optimizer_config: Mapping[str, Any], total_steps: int, peak_lrs: Mapping[str, float] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with clipping and the warmup + cosine schedule, from the config's `optimizer` section.

    Keys used: peak_lr, end_lr_fraction, warmup_steps and warmup_fraction (the warmup is the
    larger of the two), decay_steps (0: `total_steps`), b1, b2, eps, weight_decay, clip_norm.
    `peak_lrs` (top-level parameter subtree -> peak learning rate) gives each subtree an optimizer
    of its own, clipped by its own gradient norm (PPO's policy and value model); the parameters then
    have exactly those subtrees. Returns the optimizer and the schedule of the config's peak_lr
    (the loop logs the learning rate from it).
    """
    length = optimizer_config["decay_steps"] or total_steps
    warmup_steps = max(optimizer_config["warmup_steps"], round(optimizer_config["warmup_fraction"] * length))

    def adamw(peak_lr: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
        schedule = learning_rate_schedule(peak_lr, warmup_steps, length, optimizer_config["end_lr_fraction"])
        return optax.chain(
            optax.clip_by_global_norm(optimizer_config["clip_norm"]),
            optax.adamw(
                learning_rate=schedule,
                b1=optimizer_config["b1"],
                b2=optimizer_config["b2"],
                eps=optimizer_config["eps"],
                weight_decay=optimizer_config["weight_decay"],
                mask=weight_decay_mask,
            ),
        ), schedule

    optimizer, schedule = adamw(optimizer_config["peak_lr"])
    if not peak_lrs:
        return optimizer, schedule
    return subtree_optimizers({name: adamw(peak_lr)[0] for name, peak_lr in peak_lrs.items()}), schedule


class SubtreeOptimizers(NamedTuple):
    """An optimizer per top-level parameter subtree: its state is `{subtree: that optimizer's state}`.
    (optax.multi_transform masks every optimizer over the whole tree, which optax.tree_map_params,
    and so the train state's shardings, cannot follow.)"""

    init: Callable
    update: Callable
    groups: Mapping[str, optax.GradientTransformation]


def subtree_optimizers(groups: Mapping[str, optax.GradientTransformation]) -> SubtreeOptimizers:
    def init(params):
        return {name: group.init(params[name]) for name, group in groups.items()}

    def update(updates, state, params=None):
        stepped = {name: group.update(updates[name], state[name], None if params is None else params[name])
                   for name, group in groups.items()}
        return {name: new[0] for name, new in stepped.items()}, {name: new[1] for name, new in stepped.items()}

    return SubtreeOptimizers(init, update, dict(groups))
