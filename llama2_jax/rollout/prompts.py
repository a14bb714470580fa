"""The prompts a stage samples for: encoded in the chat format, and checked against the models that
will read them.

    check_models_of(config, tokenizer, models, ...)  the context every model can read, or one error
    encode_prompts(prompts, tokenizer, budget)       those that fit, as token ids (a PromptSet)
    on_policy_prompts(config, tokenizer, section, context)
                                                     an on-policy stage's training and held-out prompts
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
import numpy as np

from llama2_jax import storage
from llama2_jax.checkpoint.load import KIND_NAMES, checkpoint_config, detect_format, tokenizer_file
from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.prompts import Prompt, split_prompts
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.rollout.sampler import CUT_ANSWER_EOS


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts that fit, as the policy reads them: their index in the split, token ids and safety flags."""

    prompts: list[Prompt]
    indices: list[int]
    tokens: list[list[int]]
    skipped: int

    @property
    def is_safety(self) -> np.ndarray:
        return np.array([self.prompts[index].safety for index in self.indices], bool)

    def dialog(self, prompt: int) -> list:
        """The messages of prompt `prompt` (an index into `tokens`)."""
        return self.prompts[self.indices[prompt]].dialog()


def encode_prompts(prompts: list[Prompt], tokenizer: Tokenizer, budget: int) -> PromptSet:
    """The prompts in the chat format; those longer than `budget` tokens are skipped and counted."""
    indices, tokens = [], []
    for index, prompt in enumerate(prompts):
        ids = encode_dialog(tokenizer, prompt.messages).tokens
        if len(ids) <= budget:
            indices.append(index)
            tokens.append(ids)
    return PromptSet(prompts, indices, tokens, len(prompts) - len(indices))


def check_models_of(config: ml_collections.ConfigDict, tokenizer: Tokenizer, models: Mapping[str, tuple[str, str]],
                    limit_key: str, max_new_tokens: int) -> int:
    """`models` (config key -> (path, kind); empty paths skipped) hold models of their kind with the
    policy's tokenizer, and leave room for a prompt before `max_new_tokens`; the context all can read."""
    context = config.model.max_seq_len
    for key, (path, kind) in models.items():
        if not path:
            continue
        model_config, found = checkpoint_config(path)
        if found != kind:
            what = "a reward model (python -m llama2_jax reward)" if kind == "reward" else "a language model"
            raise ValueError(f"{key} {path} holds a {KIND_NAMES.get(found, found)}; it must be {what}")
        own = tokenizer_file(path, detect_format(path))
        if own is None or storage.as_path(own).read_bytes() != tokenizer.path.read_bytes():
            raise ValueError(f"{key} {path} has {'no' if own is None else 'another'} tokenizer.model than the policy "
                             f"{config.init_checkpoint}'s; every model must read the same token ids (train them from "
                             "the same SFT model)")
        if model_config.vocab_size != config.model.vocab_size:
            raise ValueError(f"{key} {path} has a vocabulary of {model_config.vocab_size} tokens, the policy "
                             f"{config.model.vocab_size}; every model must read the same token ids")
        context = min(context, model_config.max_seq_len)
    if context <= max_new_tokens:
        raise ConfigError(f"{limit_key} {max_new_tokens} leaves no room for a prompt in a context of {context} "
                          "tokens (the smallest of the policy's and the models'); lower it")
    return context


def on_policy_prompts(config: ml_collections.ConfigDict, tokenizer: Tokenizer, section: str,
                      context: int) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts and the held-out ones (None without evaluations) of an on-policy stage
    whose `section` (ppo, grpo, ...) sets `max_new_tokens` and `eval_prompts`: those that leave room
    for an answer in `context` and train.seq_len, the others skipped and counted."""
    settings = config[section]
    budget = min(context - CUT_ANSWER_EOS, config.train.seq_len) - settings.max_new_tokens
    if budget < 1:
        raise ConfigError(f"train.seq_len {config.train.seq_len} leaves no room for a prompt before "
                          f"{section}.max_new_tokens {settings.max_new_tokens}; raise it or lower "
                          f"{section}.max_new_tokens")
    training = encode_prompts(split_prompts(config.data, config.data.train_split), tokenizer, budget)
    if not training.indices:
        raise ValueError(f"none of the {len(training.prompts)} training prompts fits in {budget} tokens; give shorter "
                         "prompts or raise train.seq_len")
    held_out = None
    if settings.eval_prompts and config.train.eval_every:
        held_out = encode_prompts(split_prompts(config.data, config.data.eval_split)[:settings.eval_prompts],
                                  tokenizer, budget)
        held_out = held_out if held_out.indices else None
    return training, held_out
