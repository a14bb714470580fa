"""`python -m llama2_jax score`: reward-model scores for a file of responses, written as JSON lines.

    python -m llama2_jax score --checkpoint runs/reward --input responses.jsonl --out scored.jsonl

Each input line is an object with `"prompt"` (a string, or a dialog ending with a user turn, as
`{"role", "content"}` messages) and either `"response"` (one answer) or `"chosen"` and `"rejected"`
(a preference pair, as the reward stage reads them). Each output line is the input object with
`"score"`, or `"chosen_score"` and `"rejected_score"`, added: σ of the reward, in (0, 1), with the
text encoded exactly as in training (llama2_jax/reward.py). `--checkpoint` is anything
`load_pretrained` reads that holds a reward model: a reward workdir, an export of one, or a Hugging
Face LlamaForSequenceClassification.

At the end a line sums the scores up: for pairs, how many chosen answers score above their rejected
one (the reward stage's held-out accuracy, on this file) and the mean score of each side; for single
responses, their mean score. The bundled held-out pairs read as they are:

    python -m llama2_jax score --checkpoint runs/reward_helpfulness \
        --input llama2_jax/assets/demo/helpfulness_pairs_validation.jsonl --out runs/scored.jsonl
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from llama2_jax.cli import ArgumentParser, print_phase, reports_errors

# The fields of an input line that hold responses, and the fields their scores go to.
RESPONSE_FIELDS = {"response": "score", "chosen": "chosen_score", "rejected": "rejected_score"}


def read_inputs(path: str) -> list[dict]:
    """The input objects, each with a prompt and a response or a pair; one clear error per bad line."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
            fields = [field for field in RESPONSE_FIELDS if field in record] if isinstance(record, dict) else []
            if fields not in (["response"], ["chosen", "rejected"]) or "prompt" not in record:
                raise ValueError(f"{path}:{number}: expected an object with \"prompt\" and either \"response\" "
                                 "or \"chosen\" and \"rejected\"")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no responses to score")
    return records


def summary(records: Sequence[dict]) -> str:
    """The scored records in one line: pairs whose chosen answer scores above the rejected one, and
    the mean score of each side; the mean score of single responses."""
    parts = []
    pairs = [record for record in records if "chosen_score" in record]
    if pairs:
        above = sum(record["chosen_score"] > record["rejected_score"] for record in pairs)
        chosen, rejected = (np.mean([record[side] for record in pairs]) for side in ("chosen_score", "rejected_score"))
        parts.append(f"{_count(len(pairs), 'pair')}: chosen scored above rejected in {above} "
                     f"(accuracy {above / len(pairs):.3f}); mean score {chosen:.3f} chosen, {rejected:.3f} rejected")
    responses = [record["score"] for record in records if "score" in record]
    if responses:
        parts.append(f"{_count(len(responses), 'response')}: mean score {np.mean(responses):.3f}")
    return "; ".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    from llama2_jax.checkpoint.load import load_with_tokenizer
    from llama2_jax.reward import score

    parser = ArgumentParser(prog="python -m llama2_jax score", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="reward-model checkpoint directory or training workdir")
    parser.add_argument("--input", required=True, help=".jsonl of prompts with a response or a pair")
    parser.add_argument("--out", required=True, help="output .jsonl: the input lines with their scores")
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: tokenizer.model beside the checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    args = parser.parse_args(argv)
    records = read_inputs(args.input)
    model, tokenizer = load_with_tokenizer(args.checkpoint, args.tokenizer, args.compute_dtype, param_dtype=args.dtype)
    inputs = [(record, field) for record in records for field in RESPONSE_FIELDS if field in record]
    print_phase(f"scoring {len(inputs)} responses with {args.checkpoint}")
    scores = score(model, tokenizer, [record["prompt"] for record, _ in inputs],
                   [record[field] for record, field in inputs], batch_size=args.batch_size)
    for (record, field), value in zip(inputs, scores):
        record[RESPONSE_FIELDS[field]] = round(float(value), 6)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        print(f"wrote {len(inputs)} scores to {args.out}")
        print(summary(records))
    return 0
