"""`python -m llama2_jax eval`: perplexity on held-out text, or a multiple-choice task.

    python -m llama2_jax eval --checkpoint runs/tiny --dataset shakespeare:validation --out perplexity.json
    python -m llama2_jax eval --checkpoint runs/tiny --text held_out/ --out perplexity.json
    python -m llama2_jax eval --checkpoint runs/tiny --task llama2_jax/assets/demo/next_line_choice.jsonl \
        --out next_line.json [--shots 3]

`--text`: text files (a document each) or JSONL with a `text` field (a document per line), or
`--dataset NAME:SPLIT`, the documents of a prepared text dataset (default split: validation); BOS
prepended, no EOS, long documents in consecutive windows (llama2_jax/eval/perplexity.py). The output
holds `perplexity`, `nll_per_token` and `tokens`. `--task`: JSON lines `{"context", "choices",
"answer"}` scored by log-likelihood (llama2_jax/eval/multiple_choice.py); the output holds
`accuracy` and `accuracy_norm`. Both run batched on the model's mesh.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax

from llama2_jax.cli import ArgumentParser, UsageError, print_phase, reports_errors
from llama2_jax.commands.model_flags import load_for_sampling
from llama2_jax.eval import multiple_choice, perplexity


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or training workdir")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--text", nargs="+", help="held-out text files or directories, or JSONL with a text field")
    parser.add_argument("--dataset", help="or a prepared text dataset's split, e.g. shakespeare:validation")
    parser.add_argument("--task", help="a multiple-choice task, JSON lines {context, choices, answer}")
    parser.add_argument("--shots", type=int, default=0, help="answered examples before each question (--task)")
    parser.add_argument("--seed", type=int, default=0, help="which examples are the shots")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--out", required=True, help="the figures as JSON")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.text, args.dataset, args.task))) != 1:
        raise UsageError("give --text or --dataset (perplexity), or --task (multiple choice): one of them")
    # The inputs are read before the weights, so a wrong path fails at once.
    if args.text or args.dataset:
        documents = (perplexity.read_documents(args.text) if args.text
                     else perplexity.dataset_documents(*args.dataset.partition(":")[::2]))
    else:
        examples = multiple_choice.read_task(args.task)
    model, tokenizer = load_for_sampling(args)
    if args.text or args.dataset:
        print_phase(f"perplexity of {len(documents)} documents")
        result = perplexity.perplexity(model, tokenizer, documents, batch_size=args.batch_size)
    else:
        shots = f", {args.shots} shots each" if args.shots else ""
        print_phase(f"scoring the choices of {len(examples)} questions{shots}")
        result = multiple_choice.evaluate(model, tokenizer, examples, shots=args.shots, seed=args.seed,
                                          batch_size=args.batch_size)
    if jax.process_index() == 0:
        perplexity.write_json(args.out, {"checkpoint": args.checkpoint, **result})
        print(json.dumps(result))
    return 0
