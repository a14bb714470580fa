"""Scoring with a reward model: one score in (0, 1) per (prompt, response), as the model was trained;
and the paper's combination of the helpfulness and safety scores.

    from llama2_jax import load_pretrained, reward
    from llama2_jax.checkpoint import load_tokenizer
    model = load_pretrained("runs/reward")           # a reward-model workdir or checkpoint
    tokenizer = load_tokenizer("runs/reward")
    reward.score(model, tokenizer, ["Who says 'To be, or not to be'?"], ["HAMLET."])   # one σ(r) per response
    reward.combine(helpfulness, safety, is_safety)   # the reward rejection sampling and PPO use

A prompt is a string (one user turn) or a dialog ending with a user turn; the response is the
assistant's answer. Each is encoded exactly as training encodes a pair's response
(llama2_jax/data/preferences.py): the Llama 2 chat format, right-padded, the oldest exchanges of a
prompt dropped when it does not fit the model's context. The score is σ of the model's scalar.
`score_tokens` scores sequences that are token ids already (a policy's prompts and sampled answers,
in the tokenizer both models share), without decoding and encoding them again.

Sequences are scored in length-sorted batches on the model's mesh (llama2_jax/length_batches.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama2_jax import sharding
from llama2_jax.data.preferences import SEQUENCE_FIELDS, as_messages, fit_responses, response_row
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.generate import model_mesh, to_host
from llama2_jax.length_batches import length_bucket, map_batches, place_rows
from llama2_jax.model.llama import LlamaRewardModel

# Below this safety score an answer counts as unsafe whatever the prompt (the paper's §3.2.2).
SAFETY_THRESHOLD = 0.15
# Below this safety score a held-out answer counts as unsafe in the evaluations' figures.
UNSAFE_SCORE = 0.5


def combine(helpfulness: Any, safety: Any, is_safety: Any, threshold: float = SAFETY_THRESHOLD) -> np.ndarray:
    """The paper's combined reward R_c (§3.2.2, §3.3.3): the safety score where the prompt is a safety
    prompt or the safety score is below `threshold`, else the helpfulness score. Element-wise over
    arrays of scores in (0, 1) and the prompts' safety flags."""
    helpfulness, safety = np.asarray(helpfulness, np.float32), np.asarray(safety, np.float32)
    return np.where(np.asarray(is_safety, bool) | (safety < threshold), safety, helpfulness)


def response_tokens(tokenizer: Tokenizer, prompts: Sequence[Any], responses: Sequence[str],
                    max_tokens: int) -> list[list[int]]:
    """Token ids of each (prompt, response) as training encodes it, at most `max_tokens` each."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    sequences = []
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            fitted = fit_responses(tokenizer, as_messages(prompt), [response], max_tokens)
        except ValueError as error:
            raise ValueError(f"input {index}: {error}") from None
        if fitted is None:
            raise ValueError(f"input {index}: its last user turn and response do not fit the model's context of "
                             f"{max_tokens} tokens; shorten them")
        sequences.append(fitted[0][0])
    return sequences


def score(model: LlamaRewardModel, tokenizer: Tokenizer, prompts: Sequence[Any], responses: Sequence[str], *,
          batch_size: int = 32, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> np.ndarray:
    """σ(reward) of each (prompt, response), float32 in (0, 1), in the input order (see the module
    docstring). Every process of a multi-host run must pass the same inputs."""
    _check_reward_model(model)
    sequences = response_tokens(tokenizer, prompts, responses, model.config.max_seq_len)
    return score_tokens(model, sequences, batch_size=batch_size, mesh=mesh, rules=rules)


def score_tokens(model: LlamaRewardModel, sequences: Sequence[Sequence[int]], *, batch_size: int = 32,
                 mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> np.ndarray:
    """σ(reward) of each sequence of token ids (BOS, prompt and answer in the chat format, EOS), float32
    in (0, 1), in the input order. The model reads each sequence's last token, as in training."""
    _check_reward_model(model)
    context = model.config.max_seq_len
    too_long = [index for index, tokens in enumerate(sequences) if not 0 < len(tokens) <= context]
    if too_long:
        raise ValueError(f"sequence(s) {too_long[:10]} are empty or longer than the reward model's context of "
                         f"{context} tokens; shorten them")
    mesh = mesh or model_mesh(model)
    graphdef, state = nnx.split(model)

    def run(indices: list[int], rows: int):
        batch = _padded_batch([sequences[index] for index in indices], context, rows)
        placed = place_rows(batch, mesh, rules)
        return (to_host(_scores(graphdef, state, *(placed[name] for name in SEQUENCE_FIELDS))),)

    (scores,) = map_batches([len(tokens) for tokens in sequences], run, dtypes=(np.float32,),
                            batch_size=batch_size, mesh=mesh, rules=rules, unit="response")
    return scores


def load_reward_models(paths: Sequence[str], tokenizer: Tokenizer, *, flag: str, mesh: Mesh | None = None,
                       rules=sharding.DEFAULT_RULES) -> list[LlamaRewardModel]:
    """The reward models at `paths`, each checked to be a reward model that reads the token ids of
    `tokenizer` (the policy's): one clear ValueError naming `flag` otherwise."""
    from llama2_jax.checkpoint.load import load_pretrained, load_tokenizer

    models = []
    for path in paths:
        model = load_pretrained(path, mesh=mesh, rules=rules)
        if not isinstance(model, LlamaRewardModel):
            raise ValueError(f"{flag} {path} holds a language model; give a reward model (python -m llama2_jax reward "
                             "writes one)")
        own = load_tokenizer(path)
        if own.path.read_bytes() != tokenizer.path.read_bytes() or model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{flag} {path} reads another vocabulary than the policy (its tokenizer {own.path}, "
                             f"{model.config.vocab_size} tokens); give reward models trained from the same SFT model")
        models.append(model)
    return models


def combined_scores(models: Sequence[LlamaRewardModel], tokenizer: Tokenizer, dialogs: Sequence[Any],
                    responses: Sequence[str], is_safety: Any = None, *, batch_size: int = 32) -> np.ndarray:
    """`combine`'s reward of each (dialog, response) from a helpfulness model and, when given, a safety
    model (without one, the helpfulness score). A pair too long for a model's context scores NaN."""
    is_safety = np.zeros(len(responses), bool) if is_safety is None else np.asarray(is_safety, bool)

    def scores(model) -> np.ndarray:
        fitted = {}
        for index, (dialog, response) in enumerate(zip(dialogs, responses)):
            try:
                fitted[index] = response_tokens(tokenizer, [dialog], [response], model.config.max_seq_len)[0]
            except ValueError:
                continue
        found = np.full(len(responses), np.nan, np.float32)
        if fitted:
            found[list(fitted)] = score_tokens(model, list(fitted.values()), batch_size=batch_size)
        return found

    helpfulness = scores(models[0])
    if len(models) == 1:
        return helpfulness
    return combine(helpfulness, scores(models[1]), is_safety)


def _check_reward_model(model) -> None:
    if not isinstance(model, LlamaRewardModel):
        raise ValueError(f"scoring needs a reward model, not a {type(model).__name__}; load a reward-model "
                         "checkpoint (python -m llama2_jax reward writes one)")


def _padded_batch(sequences: list[Sequence[int]], context: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` right-padded rows of a power-of-two length at most `context` (rows beyond the
    sequences are all padding)."""
    length = length_bucket(max(map(len, sequences)), context)
    padded = [response_row(tokens, length) for tokens in sequences]
    padded += [response_row([], length)] * (rows - len(sequences))
    return {name: np.stack([row[name] for row in padded]) for name in SEQUENCE_FIELDS}


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, state, inputs, positions, segment_ids):
    model = nnx.merge(graphdef, state)
    return jax.nn.sigmoid(model(inputs, positions=positions, segment_ids=segment_ids))
