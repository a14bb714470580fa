"""`python -m llama2_jax tokenizer train|encode|decode`: train a SentencePiece tokenizer with Llama 2's
recipe, or look at how one splits a text.

    python -m llama2_jax tokenizer train --input DIR_OR_FILES --vocab-size 32000 --out my_tokenizer
    python -m llama2_jax tokenizer encode --model my_tokenizer.model "To be, or not to be"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llama2_jax.cli import ArgumentParser, reports_errors
from llama2_jax.data.tokenizer import Tokenizer, train_tokenizer


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m llama2_jax tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a tokenizer with Llama 2's recipe")
    train.add_argument("--input", nargs="+", required=True, help="text files or directories of them")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--input-sentence-size", type=int, default=0, help="sample this many lines (0: all)")
    train.add_argument("--seed", type=int, default=0)
    for name, help_text in (("encode", "print the token ids and pieces of a text"),
                            ("decode", "print the text of token ids")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", default=None, help="tokenizer .model (default: the bundled one)")
        sub.add_argument("values", nargs="+", help="text to encode, or token ids to decode")
    return parser.parse_args(argv)


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point: train, encode or decode."""
    args = _parse_args(argv)
    if args.command == "train":
        tokenizer = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size,
                                    input_sentence_size=args.input_sentence_size, seed=args.seed)
        print(f"wrote {args.out}.model and {args.out}.vocab ({tokenizer.vocab_size} pieces)")
    elif args.command == "encode":
        tokenizer = Tokenizer(args.model)
        ids = tokenizer.encode(" ".join(args.values), bos=False)
        print(" ".join(map(str, ids)))
        print(" ".join(tokenizer.id_to_piece(token) for token in ids))
    else:
        tokenizer = Tokenizer(args.model)
        sys.stdout.write(tokenizer.decode(int(value) for value in args.values) + "\n")
    return 0
