"""`python -m llama2_jax data <build|tokenize|info>`: build tfds datasets from local files, tokenize
them once into array_record rows of token ids packed to the training length, and show what a
dataset holds.

    data build --name mycorpus --format text --input docs/ --holdout-fraction 0.01
    data tokenize --dataset local_text/mycorpus --seq-len 4096 --out /data/mycorpus_4096 [--tokenizer tok.model]
    data info --dataset shakespeare
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llama2_jax.cli import ArgumentParser, reports_errors
from llama2_jax.data import sources, tokenized
from llama2_jax.data.tokenizer import Tokenizer


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m llama2_jax data", description=__doc__)
    parser.add_argument("--data-dir", default="", help="tfds data_dir (default ~/.cache/llama2_jax/tensorflow_datasets)")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a tfds dataset (array_record) from local files")
    build.add_argument("--name", required=True, help="dataset name; loads later as <builder>/<name>")
    build.add_argument("--input", nargs="+", required=True, help="files or directories")
    build.add_argument("--format", choices=sources.FORMATS, default="text")
    build.add_argument("--text-field", default="text", help="JSONL field with the text (format jsonl)")
    build.add_argument("--document-chars", type=int, default=0,
                       help="cut text files at blank lines into documents of about this size (0: whole files)")
    build.add_argument("--holdout-fraction", type=float, default=0.0, help="share held out as `validation`")
    build.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")

    tokenize = commands.add_parser("tokenize", help="tokenize a text dataset once into packed rows of token ids")
    tokenize.add_argument("--dataset", default="shakespeare",
                          help="a prepared text dataset: shakespeare, a local one by name (mycorpus), a tfds name")
    tokenize.add_argument("--out", required=True, help="output directory (set it as data.tokenized_dir)")
    tokenize.add_argument("--seq-len", type=int, required=True,
                          help="predictions per row: the train.seq_len the rows are read with")
    tokenize.add_argument("--packing-bins", type=int, default=tokenized.DEFAULT_PACKING_BINS,
                          help="rows the first-fit packer fills at once (more: less padding, slower)")
    tokenize.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the bundled one)")

    info = commands.add_parser("info", help="splits, sizes and metadata of a prepared dataset")
    info.add_argument("--dataset", default="shakespeare")
    return parser.parse_args(argv)


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    args = _parse_args(argv)
    data_dir = args.data_dir or None
    if args.command == "build":
        builder = sources.build_local_dataset(
            args.name, args.input, format=args.format, data_dir=data_dir, text_field=args.text_field,
            document_chars=args.document_chars, holdout_fraction=args.holdout_fraction,
            skip_bad_lines=args.skip_bad_lines)
        print(sources.describe(builder))
        stage = sources.KINDS[sources.dataset_kind(builder)][1]
        print(f"train on it with `python -m llama2_jax {stage} ... --config.data.dataset={args.name}`")
    elif args.command == "tokenize":
        builder = sources.prepared_dataset(args.dataset, data_dir)
        sources.check_kind(builder, "text")
        metadata = tokenized.write_tokenized(builder, Tokenizer(args.tokenizer), args.out, seq_len=args.seq_len,
                                             packing_bins=args.packing_bins)
        print(json.dumps(metadata["splits"], indent=2))
        print(f"train with --config.data.tokenized_dir={args.out} --config.train.seq_len={args.seq_len}")
    else:
        print(sources.describe(sources.prepared_dataset(args.dataset, data_dir)))
    return 0
