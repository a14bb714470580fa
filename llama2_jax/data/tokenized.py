"""Tokenize a text dataset once, packed into rows of seq_len, for large and multi-host runs.

Layout of a tokenized dataset directory:
    tokenized.json        tokenizer hash and vocab size, source dataset, dtype, seq_len, per-split counts
    SPLIT.array_record    one record per packed row (`encode_row`): its pieces' token ids back to back

Documents become BOS ... EOS, are cut into pieces of at most seq_len predictions (as on the fly,
`text.DocumentChunks`) and first-fit packed, in a fixed shuffled order, into rows. Because rows are
records, a row is read by its index alone: the training batch of a step is the same rows whatever the
number of processes that read it (row_batches.py). Reading skips SentencePiece entirely; a directory
written with another tokenizer or another seq_len is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import grain
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from llama2_jax import storage
from llama2_jax.data import sources
from llama2_jax.data.records import DataError
from llama2_jax.data.text import DocumentChunks
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.metrics import Progress

METADATA_FILE = "tokenized.json"
FORMAT = "packed_rows"
DEFAULT_PACKING_BINS = 64  # rows filled at once while packing: more, less padding
_ENCODE_BATCH = 256  # documents per SentencePiece call (it threads within a call)
_DOCUMENT_ORDER_SEED = 0  # documents are packed in a fixed shuffled order, so rows mix documents
_HEADER_DTYPE = np.dtype("<i4")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()


def is_configured(data_config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for pre-tokenized text (data.pretokenize or data.tokenized_dir)."""
    return bool(data_config.pretokenize or data_config.tokenized_dir)


def encode_row(predictions: np.ndarray, tokens: np.ndarray) -> bytes:
    """A row as bytes: the piece count, each piece's number of predictions (int32), then the
    pieces' tokens back to back, one more than its predictions per piece (the last target)."""
    header = np.concatenate([[len(predictions)], predictions]).astype(_HEADER_DTYPE)
    return header.tobytes() + tokens.tobytes()


def decode_row(record: bytes, dtype: np.dtype, seq_len: int) -> dict[str, np.ndarray]:
    """A packed next-token row (text.next_token_spec's fields) from `encode_row`'s bytes: segment
    ids 1, 2, ... per piece and 0 on padding, positions restarting at 0, weight 1 on every prediction."""
    count = int(np.frombuffer(record, _HEADER_DTYPE, 1)[0])
    predictions = np.frombuffer(record, _HEADER_DTYPE, count, offset=_HEADER_DTYPE.itemsize)
    tokens = np.frombuffer(record, dtype, offset=_HEADER_DTYPE.itemsize * (count + 1)).astype(np.int32)
    piece_starts = np.cumsum(predictions + 1) - (predictions + 1)
    is_first, is_last = np.zeros(len(tokens), bool), np.zeros(len(tokens), bool)
    is_first[piece_starts], is_last[piece_starts + predictions] = True, True
    used = int(predictions.sum())
    first_prediction = np.repeat(np.cumsum(predictions) - predictions, predictions)
    row = {"inputs": tokens[~is_last], "targets": tokens[~is_first],
           "loss_weights": np.ones(used, np.float32),
           "positions": (np.arange(used) - first_prediction).astype(np.int32),
           "segment_ids": np.repeat(np.arange(1, count + 1, dtype=np.int32), predictions)}
    return {name: np.pad(values, (0, seq_len - used)) for name, values in row.items()}


def _row_bytes(packed: dict[str, np.ndarray], dtype: np.dtype) -> tuple[bytes, int]:
    """grain's packed row (inputs, targets, inputs_segment_ids) as `encode_row` bytes, and its predictions."""
    segment_ids = packed["inputs_segment_ids"]
    used = int(np.count_nonzero(segment_ids))
    predictions = np.bincount(segment_ids[:used])[1:]
    ends = np.cumsum(predictions)
    # The packer appends pieces one after another, so a piece's tokens are its inputs and its last target.
    tokens = np.insert(packed["inputs"][:used], ends, packed["targets"][ends - 1])
    return encode_row(predictions, tokens.astype(dtype)), used


class _EncodeDocuments:
    """Documents start .. start + _ENCODE_BATCH of the shuffled order -> their next-token pieces."""

    def __init__(self, source, order: np.ndarray, tokenizer: Tokenizer, seq_len: int):
        self.source, self.order, self.tokenizer = source, order, tokenizer
        self.chunks = DocumentChunks(tokenizer, seq_len)
        self.documents_done = 0

    def __call__(self, start: int) -> list[dict[str, np.ndarray]]:
        examples = self.source.__getitems__(self.order[start:start + _ENCODE_BATCH].tolist())
        texts = [example["text"].decode("utf-8") for example in examples]
        self.documents_done += len(texts)
        return [{"inputs": piece["inputs"], "targets": piece["targets"]}
                for ids in self.tokenizer.encode_batch(texts, bos=True, eos=True)
                for piece in self.chunks.pieces(np.asarray(ids, np.int32))]


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1_000_000  # a batch of long documents makes many pieces: no real limit

    def flat_map(self, pieces: list) -> list:
        return pieces


def _write_split(source, tokenizer: Tokenizer, path: Path, *, seq_len: int, packing_bins: int,
                 dtype: np.dtype, label: str) -> dict[str, int]:
    order = np.random.default_rng(_DOCUMENT_ORDER_SEED).permutation(len(source))
    encode = _EncodeDocuments(source, order, tokenizer, seq_len)
    # Read in the main thread: SentencePiece already threads within each batch of documents.
    batches = grain.MapDataset.range(0, len(source), _ENCODE_BATCH).map(encode).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows = grain.experimental.FirstFitPackIterDataset(
        grain.experimental.FlatMapIterDataset(batches, _Flatten()),
        length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=packing_bins,
        seed=_DOCUMENT_ORDER_SEED)
    temporary = path.parent / f".{path.name}.partial"
    writer = ArrayRecordWriter(str(temporary), "group_size:1")
    counts = {"documents": len(source), "rows": 0, "predictions": 0}
    progress = Progress(len(source), unit=f"{label} document")
    for packed in rows:
        record, predictions = _row_bytes(packed, dtype)
        writer.write(record)
        counts["rows"] += 1
        counts["predictions"] += predictions
        progress.update(encode.documents_done)
    progress.close()
    writer.close()
    temporary.rename(path)  # a crash leaves no half-written split
    counts["tokens"] = counts["predictions"] + counts["documents"]  # BOS .. EOS has one token more
    return counts


def write_tokenized(builder, tokenizer: Tokenizer, root: str | os.PathLike, *, seq_len: int,
                    packing_bins: int = DEFAULT_PACKING_BINS, splits: list[str] | None = None) -> dict:
    """Tokenizes the `text` of every split of the tfds `builder` into rows of `seq_len` predictions
    in `root`; returns the metadata."""
    if "text" not in builder.info.features:
        raise DataError(f"dataset {builder.name} has no 'text' feature; only text datasets can be "
                        "pre-tokenized (chat and preference data are tokenized on the fly)")
    if storage.is_url(root):
        raise DataError(f"{root} is in a bucket; tokenize into a local directory (python -m llama2_jax data "
                        "tokenize --out DIR) and copy it there (gcloud storage cp -r DIR URL)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2" if tokenizer.vocab_size <= 2**16 else "<i4")
    metadata = {"format": FORMAT, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
                "vocab_size": tokenizer.vocab_size,
                "dataset": f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}",
                "dtype": dtype.str, "seq_len": seq_len, "packing_bins": packing_bins, "splits": {}}
    for split in splits or list(builder.info.splits):
        metadata["splits"][split] = _write_split(
            sources.data_source(builder, split), tokenizer, root / f"{split}.array_record", seq_len=seq_len,
            packing_bins=packing_bins, dtype=dtype, label=split)
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata


class PackedRows:
    """Random-access packed rows of one split, as next-token fields (`decode_row`)."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        self._records = grain.sources.ArrayRecordDataSource(str(path))
        self._dtype, self.seq_len = np.dtype(dtype), seq_len

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return decode_row(self._records[index], self._dtype, self.seq_len)


def default_root(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, seq_len: int):
    """Where `pretokenize` puts the rows when data.tokenized_dir is empty (an epath.Path: in the
    data_dir's bucket when it is one)."""
    data_dir = storage.as_path(data_config.data_dir or sources.DEFAULT_DATA_DIR)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_config.dataset)
    return (data_dir / "llama2_jax_tokens" / safe_name / tokenizer_fingerprint(tokenizer)[:12]
            / f"rows_of_{seq_len}")


def open_rows(data_config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer, seq_len: int) -> PackedRows:
    """The packed rows of `split`: from data.tokenized_dir, or (pretokenize) written on first use."""
    sources.check_local_split(data_config, split)
    root = storage.as_path(data_config.tokenized_dir) if data_config.tokenized_dir else default_root(
        data_config, tokenizer, seq_len)
    if not (root / METADATA_FILE).exists():
        if storage.is_url(root):
            raise DataError(f"{root} holds no tokenized dataset, and none is written into a bucket: tokenize "
                            f"locally (`python -m llama2_jax data tokenize --seq-len {seq_len} --out DIR`) and "
                            "copy DIR there")
        if data_config.tokenized_dir and not data_config.pretokenize:
            raise DataError(f"{root} holds no tokenized dataset; write one with "
                            f"`python -m llama2_jax data tokenize --seq-len {seq_len}` or set data.pretokenize")
        with sources.build_lock(root.parent):
            if not (root / METADATA_FILE).exists():
                write_tokenized(sources.open_builder(data_config, "text"), tokenizer, root, seq_len=seq_len,
                                packing_bins=data_config.packing_bins or DEFAULT_PACKING_BINS)
    metadata = json.loads((root / METADATA_FILE).read_text())
    _check_metadata(metadata, root, split, tokenizer, seq_len)
    return PackedRows(root / f"{split}.array_record", metadata["dtype"], seq_len)


def _check_metadata(metadata: dict, root: Path, split: str, tokenizer: Tokenizer, seq_len: int) -> None:
    retokenize = f"`python -m llama2_jax data tokenize --seq-len {seq_len}`"
    if metadata.get("format") != FORMAT:
        raise DataError(f"{root} holds whole documents, not packed rows (an earlier format); tokenize again "
                        f"with {retokenize}")
    if metadata["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{root} was tokenized with another tokenizer than {tokenizer.path}; "
                        f"re-run {retokenize} or point data.tokenized_dir elsewhere")
    if metadata["seq_len"] != seq_len:
        raise DataError(f"{root} holds rows of {metadata['seq_len']} tokens but train.seq_len is {seq_len}; "
                        f"set train.seq_len={metadata['seq_len']} or write rows of {seq_len} with {retokenize}")
    if split not in metadata["splits"]:
        raise DataError(f"{root} has no split {split!r} (it has {', '.join(metadata['splits'])})")
    if metadata["splits"][split]["rows"] == 0:
        raise DataError(f"split {split!r} in {root} is empty")
