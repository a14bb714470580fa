"""What the commands that sample share: the flags that name a model and how to sample from it, and
loading that model (generate, chat, eval, gatt, gatt-eval, distill)."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser, temperature: float, top_p: float, many: bool = False) -> None:
    """What to load and how to sample (`many`: --checkpoint may be given several times, to compare
    models)."""
    parser.add_argument("--checkpoint", required=True, action="append" if many else "store",
                        help="checkpoint directory or training workdir" + (" (repeat to compare)" if many else ""))
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: tokenizer.model beside the checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables it")
    parser.add_argument("--seed", type=int, default=0)


def load_for_sampling(args: argparse.Namespace):
    """The language model and tokenizer named by those flags, checked against each other."""
    from llama2_jax.checkpoint.load import load_with_tokenizer
    from llama2_jax.model.llama import Llama

    model, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer, args.compute_dtype,
                                           param_dtype=args.dtype)
    if not isinstance(model, Llama):
        raise ValueError(f"{args.checkpoint} holds a reward model, which scores text rather than writing it; "
                         "use `python -m llama2_jax score` with it, or give a language model here")
    return model, tokenizer
