"""Policies side by side on the same held-out prompts: what RLHF moved, by the recipe's own measures.

Every policy answers the same prompts as chat answers them (temperature 0.6, top-p 0.9, the same
seeds for every policy, so two policies' answers differ by the policies alone); the helpfulness and
safety reward models score every answer as the token ids sampled, and `reward.combine` gives the
paper's R_c; the KL of each policy to a reference (the SFT model) is the sum over the answer's tokens
of log π − log π_ref, unbiased for answers sampled from π at temperature 1 and here an estimate of how
far the chat answers moved. With instruction prompts (a prompt whose last user turn ends with a Ghost
Attention instruction), also the share of answers that follow it, checked by program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from llama2_jax import reward, sharding
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.instructions import follows_instruction
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.rollout.prompts import PromptSet
from llama2_jax.rollout.sampler import Sampler, answer_held_out, scored_sequence
from llama2_jax.rollout.scoring import combined_scores, log_probs_of, training_rows


@dataclasses.dataclass(frozen=True)
class PolicyFigures:
    """One policy's figures on the held-out prompts (means over them) and its answers' text."""

    policy: str
    reward_combined: float
    reward_helpfulness: float
    reward_safety: float
    kl_reference: float
    follows_instruction: float | None
    answers: list[str]

    def as_dict(self) -> dict:
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "answers"}


def compare(reference: str, policies: Sequence[str], reward_models: Sequence, tokenizer: Tokenizer,
            prompts: PromptSet, *, instructed: PromptSet | None = None, max_new_tokens: int, seed: int = 0,
            mesh: Mesh, rules=sharding.DEFAULT_RULES, batch_size: int = 256, log=print) -> list[PolicyFigures]:
    """The reference's figures first, then each policy's (loaded one at a time). `reward_models`:
    a helpfulness model and optionally a safety model, loaded (`reward.load_reward_models`)."""
    helpfulness_rm, safety_rm = (*reward_models, None)[:2]
    context = min(model.config.max_seq_len for model in reward_models)
    reference_model = load_pretrained(reference, "float32", mesh=mesh, rules=rules)
    sample = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, slots=batch_size, seed=seed)
    figures = []
    for path in [reference, *policies]:
        log(f"{path}: answering {len(prompts.indices)} held-out prompts")
        policy = reference_model if path == reference else load_pretrained(path, "float32", mesh=mesh, rules=rules)
        sampler = Sampler(policy, mesh, rules)
        answers = answer_held_out(sampler, prompts.tokens, **sample)
        tokens = [prompts.tokens[answer.prompt] for answer in answers]
        sequences = [scored_sequence(prompt, answer, tokenizer.eos_id) for prompt, answer in zip(tokens, answers)]
        helpfulness, safety = (None if model is None else
                               reward.score_tokens(model, sequences, batch_size=64, mesh=mesh, rules=rules)
                               for model in (helpfulness_rm, safety_rm))
        scores = combined_scores(helpfulness, safety, prompts.is_safety)
        rows = training_rows(tokens, answers, context)
        chunk = 8 * sharding.batch_shard_count(mesh, rules)
        own, against = (log_probs_of(model, rows, chunk, mesh, rules) for model in (policy, reference_model))
        kl = ((own - against) * rows["answer_mask"]).sum(axis=1)
        followed = None
        if instructed is not None:
            following = answer_held_out(sampler, instructed.tokens, **sample)
            followed = float(np.mean([follows_instruction(instructed.dialog(a.prompt), a.text(tokenizer))
                                      for a in following]))
        del sampler
        figures.append(PolicyFigures(path, float(scores.combined.mean()), float(scores.helpfulness.mean()),
                                     float(scores.safety.mean()), float(kl.mean()), followed,
                                     [a.text(tokenizer) for a in answers]))
    return figures


def markdown_table(rows: Sequence[dict], reference: str = "the reference") -> list[str]:
    """Policies' figures (`PolicyFigures.as_dict()`, `policy` as it is to be shown) as a Markdown
    table, a row per policy; the instruction column only where it was measured."""
    instructions = any(row.get("follows_instruction") is not None for row in rows)
    lines = [f"| policy | R_c | R_h | R_s | KL to {reference} |" + (" follows the instruction |" if instructions else ""),
             "|---|---|---|---|---|" + ("---|" if instructions else "")]
    for row in rows:
        line = (f"| {row['policy']} | {row['reward_combined']:.3f} | {row['reward_helpfulness']:.3f} | "
                f"{row['reward_safety']:.3f} | {row['kl_reference']:.2f} |")
        lines.append(line + (f" {row['follows_instruction']:.1%} |" if instructions else ""))
    return lines

