"""PPO configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b.

    python -m llama2_jax ppo --config=configs/ppo.py:tiny --workdir=runs/ppo
    python -m llama2_jax ppo --config=configs/ppo.py:70b --config.init_checkpoint=runs/rejection-70b \
        --config.ppo.helpfulness_rm=runs/rm-h-70b --config.ppo.safety_rm=runs/rm-s-70b \
        --config.data.dataset=rlhf_prompts --workdir=/data/runs/ppo-70b

The paper's sizes carry the paper's PPO (§3.2.3, docs/recipe.md): AdamW (β1 0.9, β2 0.95, eps 1e-5,
weight decay 0.1, clipping at 1.0) at a constant learning rate of 1e-6, 512 rollouts per iteration
in mini-batches of 64 with one optimizer step each, clip 0.2, β = 0.01 for 7B and 13B and 0.005 for
34B and 70B, 200 iterations (the paper: 200 to 400), from the rejection-sampling policy. The paper
leaves open what these choose: one pass over each rollout (`ppo.epochs`, its "one gradient step per
mini-batch"), GAE with γ 1 and λ 0.95, the value model's learning rate equal to the policy's, the
value clip 0.2, rollouts at temperature 1, answers of up to 1024 tokens, no missing-EOS penalty,
the frozen models in bfloat16.

`tiny` starts from the README's rejection-sampling policy (runs/rejection) and scores with its
reward models (runs/reward_helpfulness, runs/reward_safety). To show the effect on the bundled demo in
a few minutes on two CPU cores it trains much faster than the paper: learning rates 6e-5 (policy)
and 5e-5 (value), 32 iterations of 64 rollouts in mini-batches of 16, β 0.05, answers of up to 48
tokens, a penalty of 1 (in whitened units) for an answer cut off before EOS, and the frozen models
in float32 (bfloat16 is emulated on a CPU). `--help` with this config lists every key.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=6e-5, warmup_steps=0, steps=0, global_batch_size=16, seq_len=128),
    "small": Schedule(peak_lr=1e-5, warmup_steps=0, steps=0, global_batch_size=16, seq_len=256),
    **{size: Schedule(peak_lr=1e-6, warmup_steps=0, steps=0, global_batch_size=64, seq_len=4096)
       for size in ("7b", "13b", "34b", "70b")},
}
KL_COEF = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
# The models each CPU size starts from and scores with: what the README's commands write for it.
DEMO_MODELS = {"tiny": ("runs/rejection", "runs/reward_helpfulness", "runs/reward_safety")}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    cpu = size in CPU_SIZES
    config = base_config("ppo", size, SCHEDULES[size])
    policy, helpfulness_rm, safety_rm = DEMO_MODELS.get(size, ("", "", ""))
    config.init_checkpoint = policy
    config.optimizer.end_lr_fraction = 1.0  # a constant learning rate
    config.data.dataset = "shakespeare_prompts" if cpu else "rlhf_prompts"
    config.train.eval_every = 32 if cpu else 50  # steps: every 8 iterations of tiny
    config.train.checkpoint_every = 32 if cpu else 50
    config.ppo = ml_collections.ConfigDict(dict(
        helpfulness_rm=helpfulness_rm, safety_rm=safety_rm, value_init="helpfulness_rm",
        iterations=32 if cpu else 200,
        rollouts=64 if cpu else 512,
        epochs=1,
        value_lr=5e-5 if cpu else 1e-6,
        kl_coef=0.05 if cpu else KL_COEF[size],
        clip=0.2, value_clip=0.2, gamma=1.0, lam=0.95,
        temperature=1.0,
        max_new_tokens=48 if cpu else 1024,
        missing_eos_penalty=1.0 if cpu else 0.0,
        frozen_dtype="float32" if cpu else "bfloat16",
        batch_size=64 if cpu else 512,
        score_batch_size=64,
        eval_prompts=200 if cpu else 0,
        early_stop_kl=0.0,
        patience=0,
        device_memory_gib=0.0,
    ))
    return config
