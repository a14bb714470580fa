"""Answers from a policy: K per prompt, by continuous batching, from one decoding copy of its weights.

    sampler = Sampler(policy, mesh, rules)    # the decoding copy is made at the first call
    answers, seconds, stopped = sampler.sample(prompt_tokens, samples=K, slots=64, seed=..., ...)
    sampler.update(policy)                    # after a policy step: the copy follows the new weights
    answer_held_out(sampler, prompt_tokens, ...)   # one answer per prompt, as chat answers
    complete(model, tokenizer, prompts, ...)  # token ids in, answers with their text out (generate)
    answers_to_dialogs(model, tokenizer, dialogs, samples=K, ...)   # K texts per dialog (GAtt, distill)

The copy is the generation layout (`generate.decoding_layout`: layers unstacked, no fsdp sharding,
adapters merged, weights in the compute dtype), made once per sampler and refreshed by `update`, not
once per call. Sampling is llama2_jax/rollout/engine.py's continuous batching: `slots` answers decode
together and a slot whose answer ended takes the next one at once; the K answers of a prompt share
its prefill. Answer k to prompt p draws from a key of (seed, p, k) alone, so it is the same whatever
the slot count, the other prompts of the call, or the part of a resumable call it was sampled in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import generate, sharding
from llama2_jax.metrics import Progress
from llama2_jax.rollout import engine
from llama2_jax.rollout.engine import Answer  # noqa: F401  (the answers this module gives)

# An answer cut at the token limit is read with an EOS after it (`scored_sequence`): a prompt leaves
# room for that token beside the longest answer.
CUT_ANSWER_EOS = 1

# How held-out prompts are answered: as chat answers them (Meta's reference settings).
HELD_OUT_SAMPLING = generate.SamplingParams(temperature=0.6, top_p=0.9)

# A resumable call samples in parts of this many slot-loads of answers, each saved whole: long enough
# for slots to be refilled many times, short enough that a stop loses little.
PART_LOADS = 8


def scored_sequence(prompt: Sequence[int], answer: Answer, eos_id: int) -> list[int]:
    """What the reward models read: the prompt and the answer, ended with EOS as fine-tuning will end
    it (an answer cut at the token limit included)."""
    return [*prompt, *answer.tokens, *(() if answer.finished else (eos_id,))]


def sampling_seed(seed: int, *keys: int) -> int:
    """The seed of one sampling call (a round, an iteration): its own, from the run's seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def prompt_parts(prompt_tokens: Sequence[Sequence[int]], samples: int, rows: int) -> list[list[int]]:
    """Prompt indices sorted by length, in parts of `rows // samples` prompts (at least one): prompts
    of a part have similar lengths, so its prompt area is little longer than its longest prompt."""
    order = sorted(range(len(prompt_tokens)), key=lambda index: len(prompt_tokens[index]))
    per_part = max(1, rows // samples)
    return [order[start:start + per_part] for start in range(0, len(order), per_part)]


class Sampler:
    """A policy's decoding copy and the sampling calls that read it."""

    def __init__(self, policy: nnx.Module | None, mesh: Mesh, rules):
        self.policy, self.mesh, self.rules = policy, mesh, rules
        self.decoding_state = None

    def update(self, policy: nnx.Module) -> None:
        """Follow `policy`'s new weights: the old copy is released before the new one is made, so the
        two are never held at once."""
        self.policy, self.decoding_state = policy, None
        self.decoding_state = generate.decoding_layout(policy, self.mesh, self.rules)

    def sample(self, prompt_tokens: Sequence[Sequence[int]], *, samples: int, sampling: generate.SamplingParams,
               max_new_tokens: int, eos_id: int, slots: int, seed: int, resumable: bool = False,
               saved: Callable[[int], tuple[list[Answer], float] | None] | None = None,
               save: Callable[[int, list[Answer], float], None] | None = None,
               stop: Callable[[], bool] | None = None) -> tuple[list[Answer], float, bool]:
        """`samples` answers to every prompt, `slots` decoding at a time. `resumable`: in parts of
        PART_LOADS × `slots` answers, a part `saved(part)` returns taken as it is, every other one
        sampled and passed to `save(part, answers, seconds)`, `stop()` asked after each; otherwise
        in one call. Returns the answers (prompt-major), the seconds sampling took and whether it
        stopped early."""
        rows = PART_LOADS * slots if resumable else len(prompt_tokens) * samples
        parts = prompt_parts(prompt_tokens, samples, rows)
        answers: list[Answer] = []
        seconds = 0.0
        progress = Progress(len(parts), unit="part") if resumable else None
        for part, indices in enumerate(parts):
            found = saved(part) if saved else None
            if found is None:
                start = time.perf_counter()
                found = (self._answers(prompt_tokens, indices, samples=samples, sampling=sampling, slots=slots,
                                       max_new_tokens=max_new_tokens, eos_id=eos_id, seed=seed),
                         time.perf_counter() - start)
                if save:
                    save(part, *found)
                if stop and stop() and part + 1 < len(parts):
                    progress.close()
                    return answers + found[0], seconds + found[1], True
            answers += found[0]
            seconds += found[1]
            if progress:
                progress.update(part + 1)
        if progress:
            progress.close()
        return sorted(answers, key=lambda answer: (answer.prompt, answer.sample)), seconds, False

    def _answers(self, prompt_tokens, indices: list[int], *, seed: int, **keywords) -> list[Answer]:
        """The answers to the prompts `indices` names, each drawing as its index in `prompt_tokens`."""
        if self.decoding_state is None:
            self.decoding_state = generate.decoding_layout(self.policy, self.mesh, self.rules)
        found = engine.sample(self.policy, [prompt_tokens[index] for index in indices], seed=seed, mesh=self.mesh,
                              rules=self.rules, decoding_state=self.decoding_state, prompt_ids=indices, **keywords)
        return [Answer(indices[answer.prompt], answer.sample, answer.tokens, answer.finished, answer.log_probs)
                for answer in found]


def answer_held_out(sampler: Sampler, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                    slots: int, seed: int) -> list[Answer]:
    """One answer per prompt, in the prompts' order, sampled as chat samples; the same keys for every
    policy, so that two policies' answers differ by the policies alone."""
    answers, _, _ = sampler.sample(prompt_tokens, samples=1, sampling=HELD_OUT_SAMPLING,
                                   max_new_tokens=max_new_tokens, eos_id=eos_id, slots=slots,
                                   seed=sampling_seed(seed, 0))
    return answers


def complete(model: nnx.Module, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: generate.SamplingParams = generate.SamplingParams(), seed: int = 0, batch_size: int = 32,
             mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, samples: int = 1) -> list[Answer]:
    """`samples` answers to each prompt (token ids), `batch_size` decoding at a time: entry `i * K + j`
    is prompt i's j-th, with its tokens, their log-probs and `text(tokenizer)`."""
    sampler = Sampler(model, mesh or generate.model_mesh(model), rules)
    answers, _, _ = sampler.sample(prompts, samples=samples, sampling=sampling, max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_id, slots=batch_size, seed=seed)
    return answers


def answers_to_dialogs(model: nnx.Module, tokenizer, dialogs: Sequence[Sequence[dict]], *, max_new_tokens: int,
                       samples: int = 1, **keywords) -> list[list[str]]:
    """`samples` texts of the assistant's next answer to each dialog (ending with a user turn), in the
    Llama 2 chat format, from one prefill of it; a dialog too long for the context with the answer
    loses its oldest exchanges first. `keywords`: `complete`'s."""
    from llama2_jax.data.chat import fit_dialog

    budget = model.config.max_seq_len - max_new_tokens
    prompts = [fit_dialog(tokenizer, dialog, budget)[1] for dialog in dialogs]
    answers = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, samples=samples, **keywords)
    return [[answer.text(tokenizer) for answer in answers[index * samples:(index + 1) * samples]]
            for index in range(len(dialogs))]


def answer_dialogs(model: nnx.Module, tokenizer, dialogs: Sequence[Sequence[dict]], **keywords) -> list[str]:
    """The assistant's next answer to each dialog (`answers_to_dialogs` with one sample)."""
    return [texts[0] for texts in answers_to_dialogs(model, tokenizer, dialogs, **keywords)]
