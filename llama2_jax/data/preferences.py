"""Reward-model examples: a preference pair becomes one padded row holding both of its sequences.

Each response is scored on the prompt and the response in the Llama 2 chat format, exactly as
`encode_dialog` writes a dialog ending with that answer (BOS, `[INST] ... [/INST] answer `, EOS).
A row holds the pair as `[2, seq_len]` arrays, chosen first, each sequence right-padded (segment id
0 on padding, positions from 0), with the pair's rating, its safety labels and a weight of 1; rows of
padding have weight 0. `response_row` builds the same sequence for scoring, so a response is scored
exactly as it was seen in training.

A pair that does not fit loses the oldest complete exchanges of its prompt, for both responses
alike; pairs that cannot be used are skipped, and `scan` counts them by reason (`SKIPPED`). An
unrated pair (the open-source datasets carry no rating) is used: the loss gives it margin 0.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llama2_jax.data.batch import BatchSpec, Field, Piece
from llama2_jax.data.chat import Message, encode_dialog
from llama2_jax.data.records import RATING_LEVELS, UNRATED, DataError
from llama2_jax.data.tokenizer import Tokenizer

SEQUENCE_FIELDS = ("inputs", "positions", "segment_ids")
KEPT, CUT = "kept", "cut"
# Why a pair is not trained on.
SKIPPED = {
    "identical": "chosen and rejected are the same text",
    "unsafe_chosen": "chosen unsafe and rejected safe (the safety rule)",
    "too_long": "longer than train.seq_len even without earlier turns",
    "malformed": "not a dialog the chat format can encode",
}


def preference_spec(seq_len: int, answer_masks: bool = False) -> BatchSpec:
    """Rows of one pair each: `[2, seq_len]` token ids, positions and segment ids (chosen, then
    rejected), and per pair its rating (-1 unrated), safety labels (1 safe, 0 unsafe, -1 unknown)
    and weight. The model runs on both sequences of a row, so throughput counts both. With
    `answer_masks`, `answer_mask` `[2, seq_len]` is 1 at t where the token at t + 1 belongs to the
    final answer (its EOS included): where a language model's prediction is the answer's (DPO)."""
    pair = (2, seq_len)
    masks = {"answer_mask": Field(pair, "float32", "ones")} if answer_masks else {}
    return BatchSpec({**masks,
        "inputs": Field(pair, "int32", "tokens"),
        "positions": Field(pair, "int32", "positions"),
        "segment_ids": Field(pair, "int32", "ones"),
        "rating": Field((), "int32", "zeros"),
        "chosen_safe": Field((), "int32", "ones"),
        "rejected_safe": Field((), "int32", "ones"),
        "pair_weight": Field((), "float32", "ones"),
    }, packed=False, weight_field="pair_weight")


def as_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as messages: a string is one user turn; a tfds example's prompt (columns of role
    and content, as bytes) or a list of messages pass through as role/content dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        return [{"role": _text(role), "content": _text(content)}
                for role, content in zip(prompt["role"], prompt["content"])]
    return [{"role": message["role"], "content": message["content"]} for message in prompt]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def fit_responses(tokenizer: Tokenizer, prompt: Sequence[Message], responses: Sequence[str],
                  max_tokens: int, masks: list | None = None) -> tuple[list[list[int]], bool] | None:
    """Token ids of `prompt` + each response in the chat format, the prompt's oldest complete
    exchanges dropped (its system message kept) until every one fits in `max_tokens`; whether any
    were dropped. None when even the last user turn does not leave room. A list given as `masks`
    receives each sequence's mask of the final response's tokens and EOS."""
    kept = [{**message, "train": False} if message["role"] == "assistant" else message for message in prompt]
    first_turn = 1 if kept and kept[0]["role"] == "system" else 0
    while True:
        encoded = [encode_dialog(tokenizer, [*kept, {"role": "assistant", "content": response}])
                   for response in responses]
        sequences = [dialog.tokens for dialog in encoded]
        if max(map(len, sequences)) <= max_tokens:
            if masks is not None:
                masks.extend(dialog.loss_mask for dialog in encoded)
            return sequences, len(kept) < len(prompt)
        if len(kept) - first_turn <= 1:
            return None
        del kept[first_turn:first_turn + 2]


def response_row(tokens: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """One right-padded sequence: token ids, positions from 0, segment id 1 on its tokens."""
    row = {name: np.zeros(seq_len, np.int32) for name in SEQUENCE_FIELDS}
    row["inputs"][:len(tokens)] = tokens
    row["positions"][:len(tokens)] = np.arange(len(tokens))
    row["segment_ids"][:len(tokens)] = 1
    return row


def check_rating(rating: int) -> int:
    if rating != UNRATED and not 0 <= rating < len(RATING_LEVELS):
        raise DataError(f"a pair has rating {rating}, which is none of the four levels (0-{len(RATING_LEVELS) - 1}: "
                        f"{', '.join(RATING_LEVELS)}) nor {UNRATED} (unrated); rebuild the dataset from JSONL "
                        "with `python -m llama2_jax data build --format preferences`")
    return rating


class PreferencePairs:
    """A preference example -> [one row of the pair], or [] when the pair is skipped (`encode` says why).

    `safety_rule`: skip pairs whose chosen answer is unsafe while the rejected one is safe, as the
    paper does for all its collected data, for both reward models (pairs without safety labels pass).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, *, safety_rule: bool, answer_masks: bool = False):
        self.tokenizer, self.seq_len, self.safety_rule = tokenizer, seq_len, safety_rule
        self.answer_masks = answer_masks

    def __call__(self, example: Mapping[str, Any]) -> list[Piece]:
        return self.encode(example)[0]

    def encode(self, example: Mapping[str, Any]) -> tuple[list[Piece], str]:
        chosen, rejected = _text(example["chosen"]), _text(example["rejected"])
        rating = check_rating(int(example["rating"]))
        chosen_safe, rejected_safe = int(example["chosen_safe"]), int(example["rejected_safe"])
        if chosen.strip() == rejected.strip():
            return [], "identical"
        if self.safety_rule and (chosen_safe, rejected_safe) == (0, 1):
            return [], "unsafe_chosen"
        masks: list = []
        try:
            fitted = fit_responses(self.tokenizer, as_messages(example["prompt"]), (chosen, rejected), self.seq_len,
                                   masks)
        except ValueError:  # a reserved chat tag, or roles out of order
            return [], "malformed"
        if fitted is None:
            return [], "too_long"
        sequences, cut = fitted
        rows = [response_row(tokens, self.seq_len) for tokens in sequences]
        piece = {name: np.stack([row[name] for row in rows]) for name in SEQUENCE_FIELDS}
        if self.answer_masks:
            piece["answer_mask"] = np.zeros((2, self.seq_len), np.float32)
            for side, mask in enumerate(masks):
                piece["answer_mask"][side, :len(mask) - 1] = mask[1:]  # the prediction at t is of token t + 1
        piece.update(rating=np.int32(rating), chosen_safe=np.int32(chosen_safe),
                     rejected_safe=np.int32(rejected_safe), pair_weight=np.float32(1.0))
        return [piece], CUT if cut else KEPT


@dataclasses.dataclass(frozen=True)
class PairCounts:
    """What one pass over a preference dataset found: pairs kept whole, kept with their prompt cut,
    and skipped by reason (`SKIPPED`)."""

    name: str
    total: int
    kept: int
    cut: int
    skipped: Mapping[str, int]

    @property
    def used(self) -> int:
        return self.kept + self.cut

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {SKIPPED[reason]}" for reason, count in self.skipped.items() if count)
        return (f"{self.name}: {self.total} pairs: {self.kept} kept, {self.cut} kept with their oldest turns "
                f"dropped to fit, {sum(self.skipped.values())} skipped" + (f": {skipped}" if skipped else ""))


def scan(name: str, source, encoder: PreferencePairs) -> PairCounts:
    """Encode every pair of `source` once and count what happened to each. With the safety rule on,
    a dataset whose pairs carry safety labels must carry them on every pair (the rule cannot be
    applied to the others): a DataError names it otherwise."""
    outcomes: collections.Counter = collections.Counter()
    unlabelled = 0
    for index in range(len(source)):
        example = source[index]
        outcomes[encoder.encode(example)[1]] += 1
        unlabelled += int(example["chosen_safe"]) < 0 or int(example["rejected_safe"]) < 0
    if encoder.safety_rule and 0 < unlabelled < len(source):
        raise DataError(f"{name}: {unlabelled} of its {len(source)} pairs have no safety labels (chosen_safe, "
                        "rejected_safe) while the others do, so the safety rule cannot be applied to them; label "
                        "every pair, or set --config.reward.safety_rule=false")
    return PairCounts(name, len(source), outcomes[KEPT], outcomes[CUT],
                      {reason: outcomes[reason] for reason in SKIPPED})
