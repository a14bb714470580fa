"""Scoring with a reward model: one score in (0, 1) per (prompt, response), as the model was trained.

    from llama2_jax import load_pretrained, reward
    from llama2_jax.checkpoint import load_tokenizer
    model = load_pretrained("runs/reward")           # a reward-model workdir or checkpoint
    tokenizer = load_tokenizer("runs/reward")
    reward.score(model, tokenizer, ["Who says 'To be, or not to be'?"], ["HAMLET."])   # one σ(r) per response

A prompt is a string (one user turn) or a dialog ending with a user turn; the response is the
assistant's answer. Each is encoded exactly as training encodes a pair's response
(llama2_jax/data/preferences.py): the Llama 2 chat format, right-padded, the oldest exchanges of a
prompt dropped when it does not fit the model's context. The score is σ of the model's scalar.

Sequences are sorted by length and scored in batches on the model's mesh, each batch padded to a
power-of-two length so that a stream of inputs reuses a few compiled programs.
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
from llama2_jax.eval.likelihood import batches_by_length, length_bucket, place_rows
from llama2_jax.generate import model_mesh, to_host
from llama2_jax.model.llama import LlamaRewardModel


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
    from llama2_jax.metrics import Progress

    if not isinstance(model, LlamaRewardModel):
        raise ValueError(f"score needs a reward model, not a {type(model).__name__}; load a reward-model "
                         "checkpoint (python -m llama2_jax reward writes one)")
    sequences = response_tokens(tokenizer, prompts, responses, model.config.max_seq_len)
    mesh = mesh or model_mesh(model)
    rows, batches = batches_by_length([len(tokens) for tokens in sequences], batch_size,
                                      sharding.batch_shard_count(mesh, rules))
    graphdef, state = nnx.split(model)
    scores = np.zeros(len(sequences), np.float32)
    progress = Progress(len(sequences), unit="response")
    with sharding.logical_context(mesh, rules):
        for done, indices in enumerate(batches, start=1):
            batch = _padded_batch([sequences[index] for index in indices], model.config.max_seq_len, rows)
            placed = place_rows(batch, mesh, rules)
            scored = _scores(graphdef, state, *(placed[name] for name in SEQUENCE_FIELDS))
            scores[indices] = to_host(scored)[:len(indices)]
            progress.update(min(done * rows, len(sequences)))
    progress.close()
    return scores


def _padded_batch(sequences: list[list[int]], context: int, rows: int) -> dict[str, np.ndarray]:
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
