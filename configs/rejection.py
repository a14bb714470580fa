"""Rejection-sampling configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b.

    python -m llama2_jax rejection --config=configs/rejection.py:tiny --workdir=runs/rejection
    python -m llama2_jax rejection --config=configs/rejection.py:70b --config.init_checkpoint=runs/sft-70b \
        --config.rejection.helpfulness_rm=runs/rm-h-70b --config.rejection.safety_rm=runs/rm-s-70b \
        --config.data.dataset=rlhf_prompts --workdir=/data/runs/rejection-70b

The paper's sizes carry the paper's recipe (docs/recipe.md): four rounds (Llama 2-Chat RLHF-V1 to
V4 were trained by rejection sampling alone), temperature 1.2 (the paper's best for its RLHF models
lies in 1.2-1.3 and moves from round to round: give one value per round to re-tune it), the best of
K = 20 answers by the combined reward of both reward models, pooled over all rounds, fine-tuned on
with SFT's schedule (peak LR 2e-5, batches of 64 x 4096 tokens, 2 epochs of the pool each round).
Their prompts are a dataset of prompts with safety flags, built once:

    python -m llama2_jax data build --name rlhf_prompts --format prompts --input prompts/*.jsonl \
        --holdout-fraction 0.02

`tiny` starts from the models the README's commands write (runs/sft, runs/reward_helpfulness,
runs/reward_safety) and runs two rounds on the bundled demo prompts (shakespeare_prompts: 1,000 to
train on, 200 held out) in a few minutes on two CPU cores. `--help` with this config lists every key.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=3e-4, warmup_steps=5, steps=0, global_batch_size=16, seq_len=256, epochs=2.0),
    "small": Schedule(peak_lr=2e-4, warmup_steps=5, steps=0, global_batch_size=16, seq_len=512, epochs=2.0),
    **{size: Schedule(peak_lr=2e-5, warmup_steps=5, steps=0, global_batch_size=64, seq_len=4096, epochs=2.0)
       for size in ("7b", "13b", "34b", "70b")},
}
# The models each CPU size starts from and scores with: what the README's commands write for it.
DEMO_MODELS = {"tiny": ("runs/sft", "runs/reward_helpfulness", "runs/reward_safety")}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    cpu = size in CPU_SIZES
    config = base_config("rejection", size, SCHEDULES[size])
    policy, helpfulness_rm, safety_rm = DEMO_MODELS.get(size, ("", "", ""))
    config.init_checkpoint = policy
    config.optimizer.warmup_fraction = 0.03
    config.data.dataset = "shakespeare_prompts" if cpu else "rlhf_prompts"
    config.train.eval_every = 0  # the held-out prompts are answered and scored instead (rejection.eval_prompts)
    if cpu:
        config.train.checkpoint_every = 50
    config.rejection = ml_collections.ConfigDict(dict(
        helpfulness_rm=helpfulness_rm, safety_rm=safety_rm, sample_from="",
        samples=8 if cpu else 20,
        temperature=(1.0,) if cpu else (1.2,),
        rounds=2 if cpu else 4,
        max_new_tokens=48 if cpu else 1024,
        batch_size=256 if cpu else 512,
        score_batch_size=128 if cpu else 64,
        eval_prompts=200 if cpu else 0,
    ))
    return config
