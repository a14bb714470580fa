"""SentencePiece tokenizer: load any model (Llama 2's own included), or train one with Llama 2's recipe
(the command is `python -m llama2_jax tokenizer`, llama2_jax/commands/tokenizer.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama2_jax import storage

# SentencePiece writes spaces as this symbol, so a literal one in the text would decode as a
# space; Tokenizer.encode spells it out in byte-fallback pieces instead (see _encode_meta_symbol).
WHITESPACE_SYMBOL = "\u2581"

BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "shakespeare_4096.model"

# Llama 2's trainer_spec and normalizer_spec, as stored in its tokenizer.model: BPE, every digit its
# own token, unknown characters as UTF-8 bytes, no normalisation so any text survives the round trip.
LLAMA2_TRAINER_OPTIONS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    max_sentence_length=4192,
    shuffle_input_sentence=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or training input that cannot be trained on."""


class Tokenizer:
    """A SentencePiece model with BOS/EOS handling and exact round trips for any Unicode text."""

    def __init__(self, path: str | os.PathLike | None = None):
        """Loads `path` (a `.model` file, local or in a bucket); None loads the small tokenizer
        bundled with the package."""
        self.path = storage.as_path(path if path is not None else BUNDLED_TOKENIZER)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {self.path} not found; pass the path of a SentencePiece .model file "
                "(Llama 2's tokenizer.model works as it is) or train one with "
                "`python -m llama2_jax tokenizer train`."
            )
        model_bytes = self.path.read_bytes()
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as error:
            raise TokenizerError(f"{self.path} is not a SentencePiece model: {error}") from error
        self._processor_without_prefix = _processor_without_dummy_prefix(model_bytes)
        self._meta_symbol_ids = _byte_piece_ids(self._processor, WHITESPACE_SYMBOL)

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by BOS and EOS."""
        ids = self._encode_text(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (SentencePiece runs the batch in native threads)."""
        if any(WHITESPACE_SYMBOL in text for text in texts):
            return [self.encode(text, bos=bos, eos=eos) for text in texts]
        return self._processor.encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS, EOS and other control tokens are dropped."""
        ids = [int(token) for token in ids]
        outside = next((token for token in ids if not 0 <= token < self.vocab_size), None)
        if outside is not None:
            raise TokenizerError(f"token id {outside} is outside the {self.vocab_size} pieces of the tokenizer "
                                 f"{self.path}, so it is not the tokenizer of the model that wrote it; use that "
                                 "model's own tokenizer")
        return self._processor.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._processor.id_to_piece(int(token_id))

    def _encode_text(self, text: str) -> list[int]:
        if WHITESPACE_SYMBOL not in text:
            return self._processor.encode(text)
        return self._encode_meta_symbol(text)

    def _encode_meta_symbol(self, text: str) -> list[int]:
        # Encode the pieces between literal "▁" symbols separately (only the first gets the dummy
        # prefix space) and put the symbol's own UTF-8 bytes in between, which decode to "▁".
        first, *rest = text.split(WHITESPACE_SYMBOL)
        ids = self._processor.encode(first)
        for segment in rest:
            ids += self._meta_symbol_ids + self._processor_without_prefix.encode(segment)
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _processor_without_dummy_prefix(model_bytes: bytes) -> spm.SentencePieceProcessor:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _byte_piece_ids(processor: spm.SentencePieceProcessor, text: str) -> list[int]:
    pieces = [f"<0x{byte:02X}>" for byte in text.encode("utf-8")]
    ids = [processor.piece_to_id(piece) for piece in pieces]
    if any(token == processor.unk_id() for token in ids):
        return processor.encode(text)  # a model without byte fallback: keep SentencePiece's behaviour
    return ids


def expand_text_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named in `inputs`, with directories expanded (recursively, sorted, hidden files skipped)."""
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files += sorted(
                path for path in entry.rglob("*")
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(entry).parts)
            )
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"no files found in {', '.join(map(str, inputs))}")
    return files


def train_tokenizer(
    texts_or_files: Iterable[str] | Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    from_files: bool = True,
    num_threads: int | None = None,
    input_sentence_size: int = 0,
    seed: int = 0,
) -> Tokenizer:
    """Trains a SentencePiece model with Llama 2's recipe; writes `out_prefix`.model/.vocab.

    `texts_or_files` are paths (files or directories) when `from_files`, else an iterable of texts
    (e.g. the `text` field of a dataset). `input_sentence_size` > 0 samples that many lines.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    options = dict(
        LLAMA2_TRAINER_OPTIONS,
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        num_threads=num_threads or os.cpu_count() or 1,
        input_sentence_size=input_sentence_size,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as scratch:
        if from_files:
            files = expand_text_files(texts_or_files)
            empty = [str(path) for path in files if path.stat().st_size == 0]
            if len(empty) == len(files):
                raise TokenizerError(f"every input file is empty: {', '.join(empty)}")
            options["input"] = [str(path) for path in files]
        else:
            # Materialise the texts once: SentencePiece reads files, and a generator can be read once.
            corpus = Path(scratch) / "corpus.txt"
            with corpus.open("w", encoding="utf-8") as handle:
                for text in texts_or_files:
                    handle.write(text.rstrip("\n") + "\n")
            if corpus.stat().st_size <= 1:
                raise TokenizerError("no text to train the tokenizer on")
            options["input"] = str(corpus)
        spm.set_random_generator_seed(seed)  # only matters when input_sentence_size samples lines
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as error:
            raise TokenizerError(f"SentencePiece training failed: {error}") from error
    return Tokenizer(f"{out_prefix}.model")
