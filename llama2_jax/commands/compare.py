"""`python -m llama2_jax compare`: policies side by side on the same held-out prompts.

    python -m llama2_jax compare --reference runs/sft --policy runs/rejection --policy runs/ppo \
        --reward-models runs/reward_helpfulness runs/reward_safety --out runs/compare.json

Every policy (the reference first) answers the held-out prompts of `--prompts` (a JSONL file of
prompts as `generate` reads them, or a dataset of prompts and its split; default the bundled demo's) as chat answers them, with the same seeds; both reward
models score every answer. Printed and written per policy: the mean combined reward R_c, the mean
helpfulness R_h and safety R_s scores, and the mean KL to the reference per answer; with
`--instructions` (a dataset of prompts ending with a Ghost Attention instruction) also the share of
answers that follow it (llama2_jax/eval/policies.py says how each is measured). Prompts too long to
leave `--answer-tokens` in the reward models' context are skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax

from llama2_jax.cli import ArgumentParser, UsageError, reports_errors

DEMO_PROMPTS, DEMO_INSTRUCTIONS = "shakespeare_prompts:validation", "shakespeare_instruction_prompts:validation"


def held_out_prompts(spec: str, tokenizer, budget: int):
    """A JSONL file of prompts, or `NAME:SPLIT` of a dataset of prompts, encoded; those longer than
    `budget` tokens skipped."""
    from llama2_jax.data.config import default_data_config
    from llama2_jax.data.prompts import read_prompts, split_prompts
    from llama2_jax.rollout.prompts import encode_prompts

    if spec.endswith(".jsonl"):
        return encode_prompts(read_prompts(spec), tokenizer, budget)
    name, _, split = spec.partition(":")
    if not name or not split:
        raise UsageError(f"held-out prompts are a .jsonl file or a dataset's NAME:SPLIT, e.g. {DEMO_PROMPTS}; "
                         f"got {spec!r}")
    data = default_data_config()
    data.update(dict(dataset=name, format="prompts"))
    return encode_prompts(split_prompts(data, split), tokenizer, budget)


@reports_errors
def main(argv: Sequence[str]) -> int:
    from llama2_jax import reward, sharding
    from llama2_jax.checkpoint.load import load_tokenizer
    from llama2_jax.eval.policies import compare, markdown_table
    from llama2_jax.rollout.sampler import CUT_ANSWER_EOS

    parser = ArgumentParser(prog="python -m llama2_jax compare", description=__doc__)
    parser.add_argument("--reference", required=True, help="the policy every KL is measured to (the SFT model)")
    parser.add_argument("--policy", action="append", default=[], help="a policy to compare (repeat for more)")
    parser.add_argument("--reward-models", nargs="+", metavar="RM", required=True,
                        help="a helpfulness reward model and, optionally, a safety one")
    parser.add_argument("--prompts", default=DEMO_PROMPTS,
                        help="held-out prompts: a .jsonl file of prompts, or a dataset of prompts' NAME:SPLIT")
    parser.add_argument("--instructions", default="",
                        help=f"held-out instruction prompts, the same way (the demo's: {DEMO_INSTRUCTIONS})")
    parser.add_argument("--answer-tokens", type=int, default=48, help="longest answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the figures as JSON")
    args = parser.parse_args(argv)
    if len(args.reward_models) > 2:
        raise UsageError("--reward-models takes a helpfulness reward model and at most one safety reward model")
    tokenizer = load_tokenizer(args.reference)
    mesh, rules = sharding.make_mesh(), sharding.DEFAULT_RULES
    reward_models = reward.load_reward_models(args.reward_models, tokenizer, flag="--reward-models", mesh=mesh)
    budget = min(model.config.max_seq_len for model in reward_models) - args.answer_tokens - CUT_ANSWER_EOS
    prompts = held_out_prompts(args.prompts, tokenizer, budget)
    instructed = held_out_prompts(args.instructions, tokenizer, budget) if args.instructions else None
    log = print if jax.process_index() == 0 else (lambda *_: None)
    log(f"{len(prompts.indices)} held-out prompts ({prompts.skipped} too long skipped), "
        f"{int(prompts.is_safety.sum())} of them safety prompts"
        + (f"; {len(instructed.indices)} instruction prompts" if instructed else ""), flush=True)
    figures = compare(args.reference, args.policy, reward_models, tokenizer, prompts, instructed=instructed,
                      max_new_tokens=args.answer_tokens, seed=args.seed, mesh=mesh, rules=rules,
                      log=lambda line: log(line, flush=True))
    if jax.process_index() == 0:
        rows = [row.as_dict() for row in figures]
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump({"prompts": len(prompts.indices), "policies": rows}, out, indent=1)
        print("\n".join(markdown_table(rows)))
    return 0
