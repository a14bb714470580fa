"""Which preference datasets a reward model or DPO trains on beside its own: a dataset's companions.

A companion set belongs to a data set, not to a stage: the bundled demo pairs mix each model's own
pairs with some of the other's, and the paper's reward models mix the Meta data with the
open-source data in the shares of configs/reward.py. A stage's `mix` left at None draws in the
companions of `data.dataset` when that dataset is read as prepared or bundled; files of your own
(`data.paths`) are never mixed with anything unless the `mix` names it.
"""

from __future__ import annotations

import ml_collections

# data.dataset -> ((companion, share of the pairs drawn), ...); data.dataset takes the rest.
COMPANIONS = {
    # The bundled demo pairs (llama2_jax/assets/demo).
    "shakespeare_helpfulness": (("shakespeare_safety", 0.5),),
    "shakespeare_safety": (("shakespeare_helpfulness", 0.1),),
    # The paper's data, built by you under these names (configs/reward.py, docs/recipe.md): all the
    # helpfulness data plus as much again from the safety and open-source data; all the safety data
    # plus Anthropic Harmless, mixed 90/10 with helpfulness data.
    "meta_helpfulness": (("meta_safety", 0.25), ("open_helpfulness", 0.125), ("anthropic_harmless", 0.125)),
    "meta_safety": (("anthropic_harmless", 0.45), ("meta_helpfulness", 0.05), ("open_helpfulness", 0.05)),
}


def companions(data_config: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
    """The companions of the dataset `data_config` names: none for local files, whatever name they
    are built under, and none for a dataset COMPANIONS does not list."""
    if data_config.paths:
        return ()
    return COMPANIONS.get(data_config.dataset, ())
