"""`python -m llama2_jax generate`: completions for a file of prompts, written as JSON lines.

    python -m llama2_jax generate --checkpoint DIR --prompts prompts.txt --out completions.jsonl

The prompts file is plain text, one prompt per line (blank lines are skipped), or JSON lines
(`.jsonl`) whose objects hold either `"prompt"` (text continued as is) or `"messages"` (a dialog,
encoded in the Llama 2 chat format and answered as the assistant). Each output line holds the
prompt's index, the prompt, the completion text, its tokens, their log-probs under the model and
whether it ended with EOS (`finished`) or at the token limit.

Prompts are sorted by length and generated in batches, so each batch pads little; the output keeps
the input order. `--checkpoint` is anything `load_pretrained` reads: an exported checkpoint, a
training workdir (its newest step), Meta or Hugging Face weights.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import jax

from llama2_jax.cli import ArgumentParser, reports_errors
from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.generate import SamplingParams, complete

def load_for_sampling(args: argparse.Namespace):
    """The language model and tokenizer named by the shared flags, checked against each other."""
    from llama2_jax.checkpoint.load import load_with_tokenizer
    from llama2_jax.model.llama import Llama

    model, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer, args.compute_dtype,
                                           param_dtype=args.dtype)
    if not isinstance(model, Llama):
        raise ValueError(f"{args.checkpoint} holds a reward model, which scores text rather than writing it; "
                         "use `python -m llama2_jax score` with it, or give a language model here")
    return model, tokenizer


def add_model_flags(parser: argparse.ArgumentParser, temperature: float, top_p: float, many: bool = False) -> None:
    """Flags shared with the chat command: what to load and how to sample (`many`: --checkpoint may
    be given several times, to compare models)."""
    parser.add_argument("--checkpoint", required=True, action="append" if many else "store",
                        help="checkpoint directory or training workdir" + (" (repeat to compare)" if many else ""))
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: tokenizer.model beside the checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables it")
    parser.add_argument("--seed", type=int, default=0)


def read_prompts(path: str, tokenizer: Tokenizer) -> tuple[list[str], list[list[int]]]:
    """Prompt texts (dialogs as JSON) and their token ids, in file order."""
    with open(path, encoding="utf-8") as file:
        lines = [line.rstrip("\n") for line in file]
    texts, token_ids = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            texts.append(line)
            token_ids.append(tokenizer.encode(line, bos=True, eos=False))
            continue
        record = json.loads(line)
        if "messages" in record:
            try:
                token_ids.append(encode_dialog(tokenizer, record["messages"]).tokens)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from error
            texts.append(json.dumps(record["messages"], ensure_ascii=False))
        elif "prompt" in record:
            texts.append(record["prompt"])
            token_ids.append(tokenizer.encode(record["prompt"], bos=True, eos=False))
        else:
            raise ValueError(f"{path}:{number}: expected an object with \"prompt\" or \"messages\"")
    if not texts:
        raise ValueError(f"{path} holds no prompts")
    return texts, token_ids


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    parser = ArgumentParser(prog="python -m llama2_jax generate", description=__doc__)
    add_model_flags(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--prompts", required=True, help="text file (one prompt a line) or .jsonl")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation call")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_sampling(args)
    texts, token_ids = read_prompts(args.prompts, tokenizer)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    results = complete(model, tokenizer, token_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       seed=args.seed, batch_size=args.batch_size)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:
            for index, (text, result) in enumerate(zip(texts, results)):
                record = {"index": index, "prompt": text, "completion": result.text, "tokens": result.tokens,
                          "log_probs": [round(value, 6) for value in result.log_probs], "finished": result.finished}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} completions to {args.out}")
    return 0
