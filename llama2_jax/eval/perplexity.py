"""Perplexity on held-out text: `exp(total NLL / predicted tokens)`.

Each document is BOS + its tokens (no EOS: a text file does not say where its writer stopped); a
document longer than the model's context is read in consecutive windows of `context` predictions,
each window starting where the previous one ended, so every token but BOS is predicted exactly once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from llama2_jax.data import sources
from llama2_jax.data.records import DataError, input_files, jsonl_records
from llama2_jax.data.text import next_token_pieces
from llama2_jax.eval.likelihood import log_likelihoods


def read_documents(paths: Sequence[str], named_by: str = "--text") -> list[str]:
    """Documents of text files (one each) or JSONL files (a `text` field per line); `named_by` is
    what errors send the user to fix."""
    documents = []
    for path in input_files(paths, named_by):
        if path.suffix == ".jsonl":
            for file, line, record in jsonl_records([path], named_by=named_by):
                if not isinstance(record.get("text"), str):
                    raise DataError(f"{file}:{line}: expected a \"text\" string field")
                documents.append(record["text"])
        else:
            documents.append(path.read_text(encoding="utf-8"))
    return documents


def dataset_documents(name: str, split: str = "") -> list[str]:
    """The documents of a prepared text dataset's split (default: validation)."""
    builder = sources.prepared_dataset(name)
    sources.check_kind(builder, "text")
    source = sources.data_source(builder, split or "validation")
    return [source[index]["text"].decode("utf-8") for index in range(len(source))]


def windows(tokenizer, documents: Sequence[str], context: int) -> tuple[list[np.ndarray], int]:
    """Token windows of at most `context` predictions (plus their first input), and how many
    documents were skipped for holding no tokens."""
    sequences, empty = [], 0
    for document in documents:
        tokens = np.asarray(tokenizer.encode(document, bos=True, eos=False), np.int32)
        if len(tokens) < 2:
            empty += 1
            continue
        for piece in next_token_pieces(tokens, np.ones(len(tokens), np.float32), context):
            sequences.append(np.concatenate([piece["inputs"], piece["targets"][-1:]]))
    return sequences, empty


def perplexity(model, tokenizer, documents: Sequence[str], *, batch_size: int = 32, mesh=None, rules=None) -> dict:
    """{"perplexity", "nll_per_token", "tokens", "documents", "skipped_empty"} of `documents`."""
    sequences, empty = windows(tokenizer, documents, model.config.max_seq_len)
    if not sequences:
        raise DataError("no document holds any token to predict; give non-empty text")
    totals, counts = log_likelihoods(model, sequences, [np.ones(len(s) - 1) for s in sequences],
                                     batch_size=batch_size, mesh=mesh, rules=rules)
    tokens = int(counts.sum())
    nll = float(-totals.sum() / tokens)
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens,
            "documents": len(documents) - empty, "skipped_empty": empty}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        json.dump(result, out, indent=1)
