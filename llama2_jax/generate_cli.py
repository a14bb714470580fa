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
import sys
from collections.abc import Sequence

import jax

from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.generate import SamplingParams, generate, to_host

TOKENIZER_FILE = "tokenizer.model"


def find_tokenizer(checkpoint: str, tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer given, else `tokenizer.model` in the checkpoint or its parent (Meta's layout)."""
    if tokenizer_path:
        return Tokenizer(tokenizer_path)
    candidates = [os.path.join(checkpoint, TOKENIZER_FILE), os.path.join(checkpoint, os.pardir, TOKENIZER_FILE)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return Tokenizer(os.path.normpath(candidate))
    raise FileNotFoundError(
        f"no tokenizer found with checkpoint {checkpoint} (looked for {', '.join(map(os.path.normpath, candidates))}); "
        "pass --tokenizer PATH to the SentencePiece .model file it was trained with"
    )


def load_for_sampling(args: argparse.Namespace):
    """The model and tokenizer named by the shared flags, checked against each other."""
    from llama2_jax.checkpoint.load import load_pretrained

    tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
    overrides = {"compute_dtype": args.compute_dtype} if args.compute_dtype else {}
    model = load_pretrained(args.checkpoint, dtype=args.dtype, **overrides)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; pass the --tokenizer the checkpoint was trained with"
        )
    return model, tokenizer


def add_model_flags(parser: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    """Flags shared with the chat command: what to load and how to sample."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or training workdir")
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


def generate_all(model, tokenizer: Tokenizer, token_ids: list[list[int]], args: argparse.Namespace) -> list[dict]:
    """Results for every prompt, batched by length, in the input order."""
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    order = sorted(range(len(token_ids)), key=lambda index: len(token_ids[index]))
    results: list[dict] = [{} for _ in token_ids]
    for batch_number, start in enumerate(range(0, len(order), args.batch_size)):
        indices = order[start : start + args.batch_size]
        output = generate(
            model, [token_ids[i] for i in indices], max_new_tokens=args.max_new_tokens,
            eos_id=tokenizer.eos_id, sampling=sampling, seed=args.seed + batch_number,
        )
        log_probs = to_host(output.log_probs)
        for row, (index, tokens) in enumerate(zip(indices, output.token_lists())):
            finished = bool(tokens) and tokens[-1] == tokenizer.eos_id
            text_tokens = tokens[:-1] if finished else tokens
            results[index] = {
                "completion": tokenizer.decode(text_tokens),
                "tokens": tokens,
                "log_probs": [round(float(value), 6) for value in log_probs[row, : len(tokens)]],
                "finished": finished,
            }
    return results


def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m llama2_jax generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--prompts", required=True, help="text file (one prompt a line) or .jsonl")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation call")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_for_sampling(args)
        texts, token_ids = read_prompts(args.prompts, tokenizer)
        results = generate_all(model, tokenizer, token_ids, args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:
            for index, (text, result) in enumerate(zip(texts, results)):
                out.write(json.dumps({"index": index, "prompt": text, **result}, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} completions to {args.out}")
    return 0
