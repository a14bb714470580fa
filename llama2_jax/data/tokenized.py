"""Tokenize a text dataset once into array_record files of token ids, for large runs.

Layout of a tokenized dataset directory:
    tokenized.json        tokenizer hash and vocab size, source dataset, dtype, per-split counts
    SPLIT.array_record    one record per document: BOS ... EOS as little-endian uint16/int32 bytes
Reading skips SentencePiece entirely; a directory written with another tokenizer is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
import grain

from llama2_jax.data import sources
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.metrics import Progress

METADATA_FILE = "tokenized.json"
_ENCODE_BATCH = 256  # documents per SentencePiece call (it threads within a call)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()


class TokenSource:
    """Random-access documents of token ids (numpy arrays) of one split."""

    def __init__(self, path: Path, dtype: str):
        self._records = grain.sources.ArrayRecordDataSource(str(path))
        self._dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._records[index], self._dtype)


def default_root(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Path:
    """Where `pretokenize` puts the token ids when data.tokenized_dir is empty."""
    data_dir = Path(data_config.data_dir or sources.DEFAULT_DATA_DIR).expanduser()
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_config.dataset)
    return data_dir / "llama2_jax_tokens" / safe_name / tokenizer_fingerprint(tokenizer)[:12]


def write_tokenized(builder, tokenizer: Tokenizer, root: str | os.PathLike,
                    splits: list[str] | None = None) -> dict:
    """Tokenizes the `text` of every split of the tfds `builder` into `root`; returns the metadata."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "int32"
    metadata = {"tokenizer_sha256": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
                "dataset": f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}",
                "dtype": dtype, "splits": {}}
    for split in splits or list(builder.info.splits):
        source = sources.data_source(builder, split)
        if "text" not in builder.info.features:
            raise DataError(f"dataset {builder.name} has no 'text' feature; only text datasets can be "
                            "pre-tokenized (chat and preference data are tokenized on the fly)")
        temporary = root / f".{split}.array_record.partial"
        writer = ArrayRecordWriter(str(temporary), "group_size:1")
        documents = tokens = 0
        progress = Progress(len(source), unit=f"{split} document")
        for start in range(0, len(source), _ENCODE_BATCH):
            examples = source.__getitems__(range(start, min(start + _ENCODE_BATCH, len(source))))
            texts = [example["text"].decode("utf-8") for example in examples]
            for ids in tokenizer.encode_batch(texts, bos=True, eos=True):
                writer.write(np.asarray(ids, dtype).tobytes())
                documents, tokens = documents + 1, tokens + len(ids)
            progress.update(documents)
        progress.close()
        writer.close()
        temporary.rename(root / f"{split}.array_record")  # a crash leaves no half-written split
        metadata["splits"][split] = {"documents": documents, "tokens": tokens}
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


def open_split(data_config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> TokenSource:
    """The token ids of `split`: from data.tokenized_dir, or (pretokenize) written on first use."""
    root = Path(data_config.tokenized_dir).expanduser() if data_config.tokenized_dir else default_root(
        data_config, tokenizer)
    if not (root / METADATA_FILE).exists():
        if data_config.tokenized_dir and not data_config.pretokenize:
            raise DataError(f"{root} holds no tokenized dataset; write one with "
                            "`python -m llama2_jax data tokenize` or set data.pretokenize")
        with sources.build_lock(root.parent):
            if not (root / METADATA_FILE).exists():
                write_tokenized(sources.open_builder(data_config), tokenizer, root)
    metadata = json.loads((root / METADATA_FILE).read_text())
    if metadata["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{root} was tokenized with another tokenizer than {tokenizer.path}; "
                        "re-run `data tokenize` or point data.tokenized_dir elsewhere")
    if split not in metadata["splits"]:
        raise DataError(f"{root} has no split {split!r} (it has {', '.join(metadata['splits'])})")
    if metadata["splits"][split]["documents"] == 0:
        raise DataError(f"split {split!r} in {root} is empty")
    return TokenSource(root / f"{split}.array_record", metadata["dtype"])
