"""SFT and the policies trained from it (rejection sampling, PPO, DPO, GRPO) side by side on the
demo's held-out prompts, with the demo's own refusal and violence counts.

    python -m scripts.rlhf_demo_report --sft runs/sft --policy runs/rejection --policy runs/ppo \
        --policy runs/dpo --policy runs/grpo --policy runs/grpo_instructions

`python -m llama2_jax compare` gives the figures any data has (llama2_jax/eval/policies.py: the mean
combined reward R_c, helpfulness R_h and safety R_s scores, the KL to the SFT model per answer, the
share of the held-out instruction prompts whose answer follows the instruction); this adds, on the
safety prompts (a line whose true continuation is violent) and on the others apart, the share of
answers that refuse (one of the demo's safe replies, or empty) and that continue with violence (a
word of the demo's safety rule).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_jax import reward, sharding  # noqa: E402
from llama2_jax.checkpoint.load import load_tokenizer  # noqa: E402
from llama2_jax.commands.compare import DEMO_INSTRUCTIONS, DEMO_PROMPTS, held_out_prompts  # noqa: E402
from llama2_jax.eval.policies import compare  # noqa: E402
from llama2_jax.rollout.sampler import CUT_ANSWER_EOS  # noqa: E402
from scripts.make_demo_data import SAFE_REPLIES, is_safe  # noqa: E402

MAX_NEW_TOKENS = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT model every KL is measured to (its row comes first)")
    parser.add_argument("--policy", action="append", default=[], help="a policy to compare (repeatable)")
    parser.add_argument("--helpfulness-rm", default="runs/reward_helpfulness")
    parser.add_argument("--safety-rm", default="runs/reward_safety")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.sft)
    mesh = sharding.make_mesh()
    rms = reward.load_reward_models([args.helpfulness_rm, args.safety_rm], tokenizer, flag="--*-rm", mesh=mesh)
    budget = min(model.config.max_seq_len for model in rms) - MAX_NEW_TOKENS - CUT_ANSWER_EOS
    prompts, instructed = (held_out_prompts(spec, tokenizer, budget) for spec in (DEMO_PROMPTS, DEMO_INSTRUCTIONS))
    print(f"{len(prompts.indices)} held-out prompts, {int(prompts.is_safety.sum())} of them safety prompts; "
          f"{len(instructed.indices)} held-out instruction prompts")
    figures = compare(args.sft, args.policy, rms, tokenizer, prompts, instructed=instructed,
                      max_new_tokens=MAX_NEW_TOKENS, mesh=mesh)
    print("| policy | R_c | R_h | R_s | KL to SFT | refuse: safety / other prompts | violent: safety / other prompts "
          "| follows the instruction |")
    print("|---|---|---|---|---|---|---|---|")
    kinds = (prompts.is_safety, ~prompts.is_safety)
    for row in figures:
        texts = row.answers
        refuse = [np.mean([not texts[i] or texts[i] in SAFE_REPLIES for i in np.flatnonzero(kind)]) for kind in kinds]
        violent = [np.mean([not is_safe(texts[i]) for i in np.flatnonzero(kind)]) for kind in kinds]
        print(f"| {row.policy} | {row.reward_combined:.3f} | {row.reward_helpfulness:.3f} | {row.reward_safety:.3f} | "
              f"{row.kl_reference:.2f} | {refuse[0]:.0%} / {refuse[1]:.0%} | {violent[0]:.0%} / {violent[1]:.0%} | "
              f"{row.follows_instruction:.1%} |")


if __name__ == "__main__":
    main()
