"""The `config.data` section: which dataset, which tokenizer, and how grain loads it."""

from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: the bundled Shakespeare corpus and the bundled 4096-piece tokenizer."""
    config = ml_collections.ConfigDict()
    # Dataset name: "shakespeare" (bundled, built on first use), a name for the local files in
    # `paths` (becomes local_text/NAME, local_chat/NAME or local_preferences/NAME), or any dataset
    # already prepared in data_dir ("local_text/mycorpus", "my_tfds_dataset/config:1.0.0").
    config.dataset = "shakespeare"
    # tfds data_dir; empty: ~/.cache/llama2_jax/tensorflow_datasets.
    config.data_dir = ""
    # Local inputs (files or directories); non-empty means: build `dataset` from them on first use.
    config.paths = ()
    # Format of `paths`: text (one document per file), jsonl (a text field), chat, preferences.
    config.format = "text"
    # JSONL field holding the text when format is jsonl.
    config.text_field = "text"
    # > 0: cut text files at blank lines into documents of about this many characters.
    config.document_chars = 0
    # Share of local documents held out as the `validation` split (0: no validation split).
    config.holdout_fraction = 0.0
    # Skip malformed JSONL lines, records with missing fields and empty files (the build reports
    # how many) instead of stopping at the first one.
    config.skip_bad_lines = False
    # Split names the training loop reads.
    config.train_split = "train"
    config.eval_split = "validation"
    # SentencePiece .model; empty: the bundled Shakespeare tokenizer (4096 pieces).
    config.tokenizer_path = ""
    # Shuffle seed; -1 uses the run's seed.
    config.seed = -1
    # Shuffle documents (reshuffled every epoch) and packed rows; off only for debugging.
    config.shuffle = True
    # Rows the first-fit packer fills at once (more: less padding); 0: max(local batch, 16).
    config.packing_bins = 0
    # Threads that read and tokenize documents, and how many documents they read ahead.
    config.worker_threads = 2
    config.prefetch_documents = 64
    # Local batches prepared ahead in a background thread (0: none).
    config.prefetch_batches = 2
    # Read token ids from an array_record dataset written by `python -m llama2_jax data tokenize`
    # (tokenized_dir), or, with pretokenize, write it there (default: under data_dir) on first use.
    config.pretokenize = False
    config.tokenized_dir = ""
    return config
