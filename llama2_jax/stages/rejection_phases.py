"""The work of a rejection-sampling round, phase by phase (llama2_jax/stages/rejection.py runs them).

    sample_answers   K answers per prompt from a policy, a batch at a time, each batch saved whole
    score_answers    every (prompt, answer) by both reward models, as token ids, and their combination
    answer_held_out  the held-out prompts answered as chat answers them, to score the same way

Sampling runs in the generation layout (one copy of the weights without fsdp, made once per phase
and freed after it): prompts sorted by length, as many per call as make `batch_size` rows, the K
answers of a prompt sharing one prefill. Batch b draws from its own seed, so a resumed phase
samples the batches it had not saved exactly as the first run would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from llama2_jax import generate, reward
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.metrics import Progress


@dataclasses.dataclass(frozen=True)
class Answer:
    """One sampled answer: the prompt it answers, its number among the prompt's K, its new tokens
    (EOS included when the policy ended it), and whether the policy ended it."""

    prompt: int
    sample: int
    tokens: tuple[int, ...]
    finished: bool


@dataclasses.dataclass(frozen=True)
class Scores:
    helpfulness: np.ndarray
    safety: np.ndarray  # the helpfulness scores again when there is no safety model
    combined: np.ndarray


def part_seed(seed: int, round_number: int, part: int) -> int:
    """The seed of one sampling batch: its own, whatever batches a run had saved before."""
    return int(np.random.SeedSequence([seed, round_number, part]).generate_state(1)[0])


def prompt_batches(prompt_tokens: Sequence[Sequence[int]], samples: int, batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by length, in batches of `batch_size // samples` prompts (at least one)."""
    order = sorted(range(len(prompt_tokens)), key=lambda index: len(prompt_tokens[index]))
    per_batch = max(1, batch_size // samples)
    return [order[start:start + per_batch] for start in range(0, len(order), per_batch)]


def sample_answers(policy, prompt_tokens: Sequence[Sequence[int]], *, samples: int, sampling: generate.SamplingParams,
                   max_new_tokens: int, eos_id: int, batch_size: int, seed: Callable[[int], int], mesh: Mesh, rules,
                   saved: Callable[[int], tuple[list[Answer], float] | None],
                   save: Callable[[int, list[Answer], float], None],
                   stop: Callable[[], bool]) -> tuple[list[Answer], float, bool]:
    """`samples` answers to every prompt, batch by batch: a batch `saved(b)` returns is taken as it
    is, every other one is sampled and passed to `save(b, answers, seconds)`. `stop()` is asked after
    each batch sampled. Returns the answers (prompt-major), the seconds all batches took and whether
    it stopped early."""
    batches = prompt_batches(prompt_tokens, samples, batch_size)
    answers: list[Answer] = []
    seconds, decoding_state = 0.0, None
    progress = Progress(len(batches), unit="batch")
    for part, indices in enumerate(batches):
        found = saved(part)
        if found is None:
            start = time.perf_counter()
            decoding_state = decoding_state or generate.decoding_layout(policy, mesh, rules)
            output = generate.generate(policy, [prompt_tokens[index] for index in indices], samples=samples,
                                       max_new_tokens=max_new_tokens, eos_id=eos_id, sampling=sampling,
                                       seed=seed(part), mesh=mesh, rules=rules, decoding_state=decoding_state)
            found = ([Answer(indices[row // samples], row % samples, tuple(tokens),
                             bool(tokens) and tokens[-1] == eos_id)
                      for row, tokens in enumerate(output.token_lists())], time.perf_counter() - start)
            save(part, *found)
            if stop() and part + 1 < len(batches):
                progress.close()
                return answers + found[0], seconds + found[1], True
        answers += found[0]
        seconds += found[1]
        progress.update(part + 1)
    progress.close()
    return sorted(answers, key=lambda answer: (answer.prompt, answer.sample)), seconds, False


# An answer cut at the token limit is read with an EOS after it (`scored_sequence`): a prompt leaves
# room for that token beside the longest answer.
CUT_ANSWER_EOS = 1


def scored_sequence(prompt: Sequence[int], answer: Answer, eos_id: int) -> list[int]:
    """What the reward models read: the prompt and the answer, ended with EOS as fine-tuning will end
    it (an answer cut at the token limit included)."""
    return [*prompt, *answer.tokens, *(() if answer.finished else (eos_id,))]


def score_answers(sequences: Sequence[Sequence[int]], is_safety: np.ndarray, *, helpfulness_rm: str,
                  safety_rm: str, batch_size: int, mesh: Mesh, rules, dtype: str) -> Scores:
    """Both reward models' σ scores of every sequence (each model loaded, used and freed in turn) and
    the combined reward; without a safety model the helpfulness score is the reward."""
    helpfulness = _frozen_scores(helpfulness_rm, sequences, batch_size, mesh, rules, dtype)
    if not safety_rm:
        return Scores(helpfulness, helpfulness, helpfulness)
    safety = _frozen_scores(safety_rm, sequences, batch_size, mesh, rules, dtype)
    return Scores(helpfulness, safety, reward.combine(helpfulness, safety, is_safety))


def _frozen_scores(path: str, sequences, batch_size: int, mesh: Mesh, rules, dtype: str) -> np.ndarray:
    model = load_pretrained(path, dtype, param_dtype=dtype, mesh=mesh, rules=rules)
    scores = reward.score_tokens(model, sequences, batch_size=batch_size, mesh=mesh, rules=rules)
    del model
    return scores


# How the held-out prompts are answered: as chat answers (Meta's reference settings).
HELD_OUT_SAMPLING = generate.SamplingParams(temperature=0.6, top_p=0.9)


def answer_held_out(policy, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                    batch_size: int, seed: int, mesh: Mesh, rules) -> list[Answer]:
    """One answer per prompt, in the prompts' order, sampled as chat samples; the same seeds for every
    policy, so that two policies' answers differ by the policies alone."""
    answers, _, _ = sample_answers(
        policy, prompt_tokens, samples=1, sampling=HELD_OUT_SAMPLING, max_new_tokens=max_new_tokens,
        eos_id=eos_id, batch_size=batch_size, seed=lambda part: part_seed(seed, 0, part), mesh=mesh, rules=rules,
        saved=lambda part: None, save=lambda part, answers, seconds: None, stop=lambda: False)
    return answers
