"""`python -m llama2_jax distill`: safety context distillation data, ready for `sft`.

    python -m llama2_jax distill --checkpoint runs/sft --prompts prompts.jsonl --out distilled.jsonl \
        [--safety-rm runs/reward_safety] [--use-categories]

Each prompt (JSON lines read by llama2_jax/data/prompts.py: `"prompt"`, a string or a dialog, or
`"messages"`, up to the last user turn; optionally `"category"`, one of
llama2_jax.data.safety.RISK_CATEGORIES) is answered by the policy with
a safety preprompt as the system prompt (adjective templates; with `--use-categories`, also the
category's answer template). The output holds each prompt with that answer and without the
preprompt, so that fine-tuning on it teaches the model to answer that way unprompted. With
`--safety-rm`, the policy also answers without the preprompt and an answer is kept only if the safety
reward model scores it higher than that one, as the paper does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import jax

from llama2_jax.checkpoint.load import load_with_tokenizer
from llama2_jax.cli import ArgumentParser, print_phase, reports_errors
from llama2_jax.commands.model_flags import add_model_flags, load_for_sampling
from llama2_jax.data.prompts import read_prompts
from llama2_jax.data.safety import preprompt
from llama2_jax.generate import SamplingParams
from llama2_jax.rollout.sampler import answer_dialogs


def with_preprompt(dialog: list[dict], system: str) -> list[dict]:
    """`dialog` with the preprompt as its system prompt (before any system prompt it has)."""
    if dialog[0]["role"] == "system":
        return [{"role": "system", "content": f"{system} {dialog[0]['content']}"}, *dialog[1:]]
    return [{"role": "system", "content": system}, *dialog]


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax distill", description=__doc__)
    add_model_flags(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--prompts", required=True, help="JSON lines of adversarial prompts")
    parser.add_argument("--out", required=True, help="output chat JSONL, ready for sft")
    parser.add_argument("--safety-rm", help="safety reward model: keep answers it scores above the unprompted ones")
    parser.add_argument("--use-categories", action="store_true",
                        help="add each prompt's risk category and its answer template to the preprompt")
    parser.add_argument("--limit", type=int, default=0, help="the first N prompts only (0: all)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generation call")
    args = parser.parse_args(argv)
    policy, tokenizer = load_for_sampling(args)
    prompts = read_prompts(args.prompts)[: args.limit or None]
    dialogs, categories = [prompt.dialog() for prompt in prompts], [prompt.category for prompt in prompts]
    rng = random.Random(args.seed)
    prompted = [with_preprompt(dialog, preprompt(rng, category if args.use_categories else None))
                for dialog, category in zip(dialogs, categories)]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    generation = dict(max_new_tokens=args.answer_tokens, sampling=sampling, seed=args.seed, batch_size=args.batch_size)
    print_phase(f"answering {len(prompted)} prompts with a safety preprompt")
    answers = answer_dialogs(policy, tokenizer, prompted, **generation)
    keep = [True] * len(dialogs)
    if args.safety_rm:
        from llama2_jax.reward import score

        print_phase("answering them without it, to compare")
        unprompted = answer_dialogs(policy, tokenizer, dialogs, **generation)
        print_phase(f"scoring both answers with the safety reward model {args.safety_rm}")
        safety, safety_tokenizer = load_with_tokenizer(args.safety_rm)
        with_scores = score(safety, safety_tokenizer, dialogs, answers)
        without_scores = score(safety, safety_tokenizer, dialogs, unprompted)
        keep = [bool(better > worse) for better, worse in zip(with_scores, without_scores)]
    if jax.process_index() == 0:
        with open(args.out, "w", encoding="utf-8") as out:
            for dialog, answer, kept in zip(dialogs, answers, keep):
                if kept and answer:
                    out.write(json.dumps({"messages": [*dialog, {"role": "assistant", "content": answer}]},
                                         ensure_ascii=False) + "\n")
        kept = sum(1 for answer, kept in zip(answers, keep) if kept and answer)
        judged = f", {sum(keep)} scored safer by {args.safety_rm} than without the preprompt" if args.safety_rm else ""
        print(f"{len(dialogs)} prompts answered with a safety preprompt{judged}: wrote {kept} dialogs to {args.out}")
    return 0
