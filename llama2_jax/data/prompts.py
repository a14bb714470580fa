"""Prompts to answer, read one way by every command and stage that answers them.

    read_prompts("prompts.jsonl")            # a file: generate, distill
    split_prompts(config.data, "train")      # a dataset split: rejection sampling

A file is plain text, one prompt a line (blank lines skipped), or JSON lines: `"messages"` or
`"conversations"` (a dialog; what follows its last user turn is dropped, so fine-tuning dialogs are
prompts too) or `"prompt"` (a string, one user turn, or a list of messages, so chat and preference
records are prompts too), an optional `"safety"` flag (true: a safety prompt, for the combined
reward of llama2_jax/reward.py) and an optional `"category"` (a risk category, for safety context
distillation). A dataset of prompts is built from such JSON lines or Parquet rows (`data.format`
prompts, llama2_jax/data/sources.py); the bundled `shakespeare_prompts` holds the demo's.

A prompt given as text (a line of a text file, a `"prompt"` string) is also `text`: `generate`
continues it as it is, where the commands that answer dialogs ask it as one user turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from llama2_jax.data.chat import Message, encode_dialog
from llama2_jax.data.preferences import as_messages
from llama2_jax.data.records import DataError, parse_prompt_record
from llama2_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A dialog ending with the user turn to answer, its safety flag, and where it came from as text."""

    messages: tuple[Message, ...]
    safety: bool = False
    text: str | None = None  # the prompt as plain text, when it was given so
    category: str | None = None  # a risk category (llama2_jax.data.safety.RISK_CATEGORIES)

    def dialog(self) -> list[Message]:
        return [dict(message) for message in self.messages]

    def tokens(self, tokenizer: Tokenizer) -> list[int]:
        """What `generate` continues: the text as it is (BOS first), else the dialog in the chat format."""
        if self.text is not None:
            return tokenizer.encode(self.text, bos=True, eos=False)
        return encode_dialog(tokenizer, self.messages).tokens


def parse_prompt(record: dict[str, Any]) -> Prompt:
    """A JSONL record as a Prompt; a DataError naming the problem otherwise."""
    parsed = parse_prompt_record(record)
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise DataError(f"'category' must be a string, got {category!r}")
    dialog = "messages" in record or "conversations" in record
    text = record["prompt"] if isinstance(record.get("prompt"), str) and not dialog else None
    return Prompt(tuple(parsed["prompt"]), bool(parsed["safety"]), text, category)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a file (see the module docstring), in file order; a bad line is a DataError
    naming the file and the line."""
    with open(path, encoding="utf-8") as file:
        lines = [(number, line.rstrip("\n")) for number, line in enumerate(file, start=1) if line.strip()]
    prompts = []
    for number, line in lines:
        if not os.fspath(path).endswith(".jsonl"):
            prompts.append(Prompt(({"role": "user", "content": line},), text=line))
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}")
            prompts.append(parse_prompt(record))
        except ValueError as error:  # malformed JSON, or a DataError
            raise DataError(f"{path}:{number}: {error}") from None
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def split_prompts(data_config: ml_collections.ConfigDict, split: str) -> list[Prompt]:
    """Every prompt of a split of the dataset `data_config` names (a dataset of prompts), in order."""
    from llama2_jax.data.pipeline import open_split

    source = open_split(data_config, split, kind="prompts")
    return [Prompt(tuple(as_messages(example["prompt"])), bool(example["safety"]))
            for example in (source[index] for index in range(len(source)))]
