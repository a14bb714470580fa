"""Answers from a policy: K per prompt, a batch at a time, from one decoding copy of its weights.

    sampler = Sampler(policy, mesh, rules)    # the decoding copy is made at the first call
    answers, seconds, stopped = sampler.sample(prompt_tokens, samples=K, sampling=..., ...)
    sampler.update(policy)                    # after a policy step: the copy follows the new weights
    answer_held_out(sampler, prompt_tokens, ...)   # one answer per prompt, as chat answers

The copy is the generation layout (`generate.decoding_layout`: layers unstacked, no fsdp sharding,
adapters merged, weights in the compute dtype), made once per sampler and refreshed by `update`, not
once per call. Prompts run sorted by length, as many per call as make `batch_size` rows; the K
answers of a prompt share one prefill. Batch b draws from its own seed, so a resumed stage samples
the batches it had not saved exactly as the first run would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import generate
from llama2_jax.metrics import Progress

# An answer cut at the token limit is read with an EOS after it (`scored_sequence`): a prompt leaves
# room for that token beside the longest answer.
CUT_ANSWER_EOS = 1

# How held-out prompts are answered: as chat answers them (Meta's reference settings).
HELD_OUT_SAMPLING = generate.SamplingParams(temperature=0.6, top_p=0.9)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One sampled answer: the prompt it answers, its number among the prompt's K, its new tokens
    (EOS included when the policy ended it), and whether the policy ended it."""

    prompt: int
    sample: int
    tokens: tuple[int, ...]
    finished: bool

    def text(self, tokenizer) -> str:
        """The answer as text: EOS dropped, surrounding spaces stripped."""
        return tokenizer.decode(list(self.tokens[:-1] if self.finished else self.tokens)).strip()


def scored_sequence(prompt: Sequence[int], answer: Answer, eos_id: int) -> list[int]:
    """What the reward models read: the prompt and the answer, ended with EOS as fine-tuning will end
    it (an answer cut at the token limit included)."""
    return [*prompt, *answer.tokens, *(() if answer.finished else (eos_id,))]


def part_seed(seed: int, round_number: int, part: int) -> int:
    """The seed of one sampling batch: its own, whatever batches a run had saved before."""
    return int(np.random.SeedSequence([seed, round_number, part]).generate_state(1)[0])


def prompt_batches(prompt_tokens: Sequence[Sequence[int]], samples: int, batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by length, in batches of `batch_size // samples` prompts (at least one)."""
    order = sorted(range(len(prompt_tokens)), key=lambda index: len(prompt_tokens[index]))
    per_batch = max(1, batch_size // samples)
    return [order[start:start + per_batch] for start in range(0, len(order), per_batch)]


class Sampler:
    """A policy's decoding copy and the sampling calls that read it."""

    def __init__(self, policy: nnx.Module, mesh: Mesh, rules):
        self.policy, self.mesh, self.rules = policy, mesh, rules
        self.decoding_state = None

    def update(self, policy: nnx.Module) -> None:
        """Follow `policy`'s new weights: the old copy is released before the new one is made, so the
        two are never held at once."""
        self.policy, self.decoding_state = policy, None
        self.decoding_state = generate.decoding_layout(policy, self.mesh, self.rules)

    def release(self) -> None:
        """Free the decoding copy (the next call makes it again)."""
        self.decoding_state = None

    def sample(self, prompt_tokens: Sequence[Sequence[int]], *, samples: int, sampling: generate.SamplingParams,
               max_new_tokens: int, eos_id: int, batch_size: int, seed: Callable[[int], int],
               saved: Callable[[int], tuple[list[Answer], float] | None] | None = None,
               save: Callable[[int, list[Answer], float], None] | None = None,
               stop: Callable[[], bool] | None = None) -> tuple[list[Answer], float, bool]:
        """`samples` answers to every prompt, batch by batch; batch b samples with seed `seed(b)`. A
        batch `saved(b)` returns is taken as it is, every other one is sampled and passed to
        `save(b, answers, seconds)`; `stop()` is asked after each batch sampled. Returns the answers
        (prompt-major), the seconds all batches took and whether it stopped early."""
        batches = prompt_batches(prompt_tokens, samples, batch_size)
        answers: list[Answer] = []
        seconds = 0.0
        progress = Progress(len(batches), unit="batch")
        for part, indices in enumerate(batches):
            found = saved(part) if saved else None
            if found is None:
                start = time.perf_counter()
                if self.decoding_state is None:
                    self.decoding_state = generate.decoding_layout(self.policy, self.mesh, self.rules)
                output = generate.generate(self.policy, [prompt_tokens[index] for index in indices], samples=samples,
                                           max_new_tokens=max_new_tokens, eos_id=eos_id, sampling=sampling,
                                           seed=seed(part), mesh=self.mesh, rules=self.rules,
                                           decoding_state=self.decoding_state)
                found = ([Answer(indices[row // samples], row % samples, tuple(tokens),
                                 bool(tokens) and tokens[-1] == eos_id)
                          for row, tokens in enumerate(output.token_lists())], time.perf_counter() - start)
                if save:
                    save(part, *found)
                if stop and stop() and part + 1 < len(batches):
                    progress.close()
                    return answers + found[0], seconds + found[1], True
            answers += found[0]
            seconds += found[1]
            progress.update(part + 1)
        progress.close()
        return sorted(answers, key=lambda answer: (answer.prompt, answer.sample)), seconds, False


def answer_held_out(sampler: Sampler, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                    batch_size: int, seed: int) -> list[Answer]:
    """One answer per prompt, in the prompts' order, sampled as chat samples; the same seeds for every
    policy, so that two policies' answers differ by the policies alone."""
    answers, _, _ = sampler.sample(prompt_tokens, samples=1, sampling=HELD_OUT_SAMPLING,
                                   max_new_tokens=max_new_tokens, eos_id=eos_id, batch_size=batch_size,
                                   seed=lambda part: part_seed(seed, 0, part))
    return answers
