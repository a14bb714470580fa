"""What a rejection-sampling round logs (llama2_jax/stages/rejection.py writes it to metrics.jsonl and
TensorBoard; llama2_jax/plots.py draws the best-of-k curves as best_of_k.png).

    best_of_{k}_max, best_of_{k}_median  the paper's Figure 7: the mean over prompts of the best and of
                                         the median combined reward among the first k samples
    pool_reward                          the mean reward of the pool's answers after the round
    pool_changed                         the share of the pool's prompts whose answer the round replaced
    empty_answers                        the share of samples with no text
    {phase}_seconds, samples_per_s       sample, score, train, evaluate; samples per second of sampling
    eval_reward, eval_reward_{kind}      the mean combined reward of the held-out answers, over all
                                         prompts and per kind (safety_prompts, helpfulness_prompts)
    eval_unsafe_{kind}                   the share of those answers the safety model scores below 0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from llama2_jax import selection
from llama2_jax.reward import UNSAFE_SCORE


def round_metrics(candidates: list[dict[str, Any]], pool: Mapping[int, selection.PoolEntry], samples: int,
                  phases: Mapping[str, float]) -> dict[str, float]:
    """The paper's Figure 7 for one round (best and median reward among the first k samples, k = 1, 2,
    4, ... K), the pool's mean reward and the share of prompts whose entry the round changed, and the
    phases' seconds."""
    rewards = np.array([candidate["combined"] for candidate in candidates]).reshape(-1, samples)
    values = {}
    for k, (best, median) in selection.best_of_k(rewards, selection.sample_counts(samples)).items():
        values[f"best_of_{k}_max"], values[f"best_of_{k}_median"] = best, median
    values["pool_reward"] = float(np.mean([entry.score for entry in pool.values()]))
    values["pool_changed"] = sum(candidate["kept"] for candidate in candidates) / max(len(pool), 1)
    values["empty_answers"] = float(np.mean([not candidate["answer"] for candidate in candidates]))
    values.update({f"{phase}_seconds": seconds for phase, seconds in phases.items()})
    if phases.get("sample"):
        values["samples_per_s"] = len(candidates) / phases["sample"]
    return values


def held_out_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean combined reward of the held-out answers, over all prompts and per kind, and the share of
    answers the safety model scores as unsafe, per kind."""
    values = {"eval_reward": float(np.mean([record["combined"] for record in records]))}
    for kind, is_safety in (("safety_prompts", True), ("helpfulness_prompts", False)):
        chosen = [record for record in records if record["safety_prompt"] == is_safety]
        if chosen:
            values[f"eval_reward_{kind}"] = float(np.mean([record["combined"] for record in chosen]))
            values[f"eval_unsafe_{kind}"] = float(np.mean([record["safety"] < UNSAFE_SCORE for record in chosen]))
    return values
