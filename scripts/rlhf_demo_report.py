"""SFT and the policies trained from it (rejection sampling, PPO, DPO, GRPO) side by side on the
demo's held-out prompts.

    python -m scripts.rlhf_demo_report --sft runs/sft --policy runs/rejection --policy runs/ppo \
        --policy runs/dpo --policy runs/grpo --policy runs/grpo_instructions

Every policy answers the same held-out prompts (`shakespeare_prompts`' validation split, those that
leave 48 answer tokens in the reward models' context) as chat answers them (temperature 0.6, top-p
0.9, the same seeds for every policy); the same two reward models score every answer
(`runs/reward_helpfulness`, `runs/reward_safety` unless given). Printed per policy: the mean combined
reward R_c, helpfulness R_h and safety R_s scores, the mean KL to the SFT model per answer (the sum
over its tokens of log pi - log pi_SFT, unbiased for answers sampled from pi at temperature 1; here
an estimate of how far the chat answers moved), and, on the safety prompts (a line whose true
continuation is violent) and on the others apart, the share of answers that refuse (one of the demo's
safe replies, or empty) and that continue with violence (a word of the demo's safety rule); and the
instruction-following rate: the share of the held-out instruction prompts
(`shakespeare_instruction_prompts`, the same prompts with a Ghost Attention instruction appended)
whose answer follows the instruction, by `llama2_jax.data.instructions:follows_instruction`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_jax import reward, sharding  # noqa: E402
from llama2_jax.checkpoint.load import load_pretrained, load_tokenizer  # noqa: E402
from llama2_jax.data.instructions import follows_instruction  # noqa: E402
from llama2_jax.data.prompts import split_prompts  # noqa: E402
from llama2_jax.stages.ppo_rollouts import in_chunks, token_log_probs, training_rows  # noqa: E402
from llama2_jax.stages.rejection import encode_prompts  # noqa: E402
from llama2_jax.stages.rejection_phases import answer_held_out, scored_sequence  # noqa: E402
from scripts.make_demo_data import SAFE_REPLIES, is_safe  # noqa: E402

MAX_NEW_TOKENS = 48
CONTEXT = 128  # the demo reward models'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT model every KL is measured to (its row comes first)")
    parser.add_argument("--policy", action="append", default=[], help="a policy to compare (repeatable)")
    parser.add_argument("--helpfulness-rm", default="runs/reward_helpfulness")
    parser.add_argument("--safety-rm", default="runs/reward_safety")
    args = parser.parse_args()

    from configs.ppo import get_config

    config = get_config("tiny")
    tokenizer = load_tokenizer(args.sft)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.DEFAULT_RULES
    prompts = encode_prompts(split_prompts(config.data, config.data.eval_split), tokenizer,
                             CONTEXT - MAX_NEW_TOKENS)
    sft = load_pretrained(args.sft, "float32", mesh=mesh, rules=rules)
    rms = [load_pretrained(path, "float32", mesh=mesh, rules=rules) for path in (args.helpfulness_rm, args.safety_rm)]
    instruction_data = config.data.copy_and_resolve_references()
    instruction_data.dataset = "shakespeare_instruction_prompts"
    instructed = encode_prompts(split_prompts(instruction_data, config.data.eval_split), tokenizer,
                                CONTEXT - MAX_NEW_TOKENS)
    print(f"{len(prompts.indices)} held-out prompts, {int(prompts.is_safety.sum())} of them safety prompts; "
          f"{len(instructed.indices)} held-out instruction prompts")
    print("| policy | R_c | R_h | R_s | KL to SFT | refuse: safety / other prompts | violent: safety / other prompts "
          "| follows the instruction |")
    print("|---|---|---|---|---|---|---|---|")
    for path in [args.sft, *args.policy]:
        policy = sft if path == args.sft else load_pretrained(path, "float32", mesh=mesh, rules=rules)
        answers = answer_held_out(policy, prompts.tokens, max_new_tokens=MAX_NEW_TOKENS, eos_id=tokenizer.eos_id,
                                  batch_size=256, seed=config.train.seed, mesh=mesh, rules=rules)
        tokens = [prompts.tokens[answer.prompt] for answer in answers]
        sequences = [scored_sequence(prompt, answer, tokenizer.eos_id) for prompt, answer in zip(tokens, answers)]
        helpfulness, safety = (reward.score_tokens(rm, sequences, batch_size=64, mesh=mesh, rules=rules) for rm in rms)
        combined = reward.combine(helpfulness, safety, prompts.is_safety)
        rows = training_rows(tokens, answers, CONTEXT)
        chunk = 8 * sharding.batch_shard_count(mesh, rules)
        own, reference = (in_chunks(token_log_probs, *_split(model), rows, chunk, mesh, rules) for model in (policy, sft))
        kl = ((own - reference) * rows["answer_mask"]).sum(axis=1)
        texts = [tokenizer.decode(list(a.tokens[:-1] if a.finished else a.tokens)).strip() for a in answers]
        kinds = (prompts.is_safety, ~prompts.is_safety)
        refuse = [np.mean([not texts[i] or texts[i] in SAFE_REPLIES for i in np.flatnonzero(kind)]) for kind in kinds]
        violent = [np.mean([not is_safe(texts[i]) for i in np.flatnonzero(kind)]) for kind in kinds]
        following = answer_held_out(policy, instructed.tokens, max_new_tokens=MAX_NEW_TOKENS, eos_id=tokenizer.eos_id,
                                    batch_size=256, seed=config.train.seed, mesh=mesh, rules=rules)
        followed = np.mean([follows_instruction(instructed.prompts[instructed.indices[a.prompt]].dialog(),
                                                tokenizer.decode(list(a.tokens[:-1] if a.finished else a.tokens)))
                            for a in following])
        print(f"| {path} | {combined.mean():.3f} | {helpfulness.mean():.3f} | {safety.mean():.3f} | {kl.mean():.2f} | "
              f"{refuse[0]:.0%} / {refuse[1]:.0%} | {violent[0]:.0%} / {violent[1]:.0%} | {followed:.1%} |")


def _split(model):
    from flax import nnx

    return nnx.split(model)


if __name__ == "__main__":
    main()
