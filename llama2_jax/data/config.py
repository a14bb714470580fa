"""The `config.data` section: which dataset, which tokenizer, and how grain loads it."""

from __future__ import annotations

from pathlib import Path

import ml_collections

# The demo datasets and tasks bundled with the package (assets/demo/README.md says what each holds).
DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"

DATA_DOCS = {
    "dataset": "shakespeare (bundled), a name for the local files in data.paths, or a dataset already "
               "prepared in data_dir (mycorpus, local_text/mycorpus, a tfds name)",
    "data_dir": "tfds data_dir (empty: ~/.cache/llama2_jax/tensorflow_datasets)",
    "paths": "local files or directories of JSONL or Parquet records (or plain text, format text); "
             "non-empty: build data.dataset from them on first use",
    "format": "format of data.paths: text (a document per file), jsonl (a text field), chat, preferences, "
              "prompts (the record shapes each reads: llama2_jax/data/records.py)",
    "text_field": "field holding the text (format jsonl, and Parquet files of format text)",
    "document_chars": "> 0: cut text files at blank lines into documents of about this many characters",
    "holdout_fraction": "share of the examples of data.paths held out as the validation split (at least one; "
                        "0: none); bundled and prepared datasets keep their own splits",
    "skip_bad_lines": "skip and count malformed records and empty files instead of stopping",
    "train_split": "split the loop trains on",
    "eval_split": "split evaluations read",
    "tokenizer_path": "SentencePiece .model (empty: the initial checkpoint's in the stages after pretraining, "
                      "the bundled 4096-piece one in pretraining)",
    "seed": "shuffle seed (-1: train.seed)",
    "shuffle": "shuffle examples (anew every epoch) and packed rows; off only for debugging",
    "packing_bins": "rows the first-fit packer fills at once (more: less padding; 0: max(local batch, 16), "
                    "or 64 when pre-tokenizing)",
    "worker_threads": "threads that read and tokenize examples",
    "prefetch_documents": "examples read ahead by those threads",
    "prefetch_batches": "local batches prepared ahead in a background thread (0: none)",
    "pretokenize": "tokenize a text dataset once, packed into rows of train.seq_len, into data.tokenized_dir "
                   "(or under data_dir) and read rows by index: the same batches for any number of processes",
    "tokenized_dir": "read rows written by `python -m llama2_jax data tokenize --seq-len train.seq_len` from here",
}


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: the bundled Shakespeare corpus and the bundled 4096-piece tokenizer (DATA_DOCS says
    what each key means). Local files hold out 5 % of their examples, so that a run on them has
    something to evaluate on as a run on the bundled data has."""
    return ml_collections.ConfigDict(dict(
        dataset="shakespeare", data_dir="", paths=(), format="text", text_field="text",
        document_chars=0, holdout_fraction=0.05, skip_bad_lines=False, train_split="train",
        eval_split="validation", tokenizer_path="", seed=-1, shuffle=True, packing_bins=0,
        worker_threads=2, prefetch_documents=64, prefetch_batches=2, pretokenize=False,
        tokenized_dir="",
    ))
