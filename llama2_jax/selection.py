"""Rejection sampling's choices: the best of K answers per prompt, and the pool of the best ever.

    best = select_best(rewards, usable)                  # [prompts, K] -> the best sample per prompt
    pool, changed = update_pool(pool, offers)            # the best answer per prompt over all rounds
    curves = best_of_k(rewards, ks=(1, 2, 4, 8))         # the paper's Figure 7

Rewards are the combined reward (llama2_jax.reward.combine) of every sample, a row per prompt. The
pool is the paper's fix after RLHF-V3: selecting from the newest round alone regressed, so a prompt
keeps the best answer any round has found for it, and a newer one replaces it only by scoring
higher (the reward models stay the same across rounds, so their scores compare).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def select_best(rewards: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per prompt (row), the index of the usable sample with the highest reward, the first one on
    ties; -1 where no sample is usable (every answer empty, say)."""
    rewards, usable = np.asarray(rewards, np.float64), np.asarray(usable, bool)
    best = np.argmax(np.where(usable, rewards, -np.inf), axis=1)
    return np.where(usable.any(axis=1), best, -1)


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    """The answer a prompt trains on, its scores and the round that sampled it."""

    prompt: int  # index of the prompt in the training prompts
    answer: str
    score: float  # the combined reward
    helpfulness: float
    safety: float
    round: int


def update_pool(pool: Mapping[int, PoolEntry], offers: Iterable[PoolEntry]) -> tuple[dict[int, PoolEntry], set[int]]:
    """The pool with each offer that scores higher than its prompt's entry (or is its first), and the
    prompts whose entry changed."""
    updated, changed = dict(pool), set()
    for offer in offers:
        held = updated.get(offer.prompt)
        if held is None or offer.score > held.score:
            updated[offer.prompt] = offer
            changed.add(offer.prompt)
    return updated, changed


def sample_counts(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself: the K of the best-of-K curves."""
    counts = [1 << power for power in range(samples.bit_length()) if 1 << power < samples]
    return [*counts, samples]


def best_of_k(rewards: np.ndarray, ks: Sequence[int]) -> dict[int, tuple[float, float]]:
    """For each k: the mean over prompts (rows) of the highest and of the median reward among their
    first k samples. The maximum rising with k while the median stays is the headroom rejection
    sampling draws on (the paper's Figure 7)."""
    rewards = np.asarray(rewards, np.float64)
    return {k: (float(rewards[:, :k].max(axis=1).mean()), float(np.median(rewards[:, :k], axis=1).mean()))
            for k in ks}
