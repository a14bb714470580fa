"""GRPO configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b, and
`get_config("SIZE,instructions")` for a program reward on instruction following.

    python -m llama2_jax grpo --config=configs/grpo.py:tiny --workdir=runs/grpo
    python -m llama2_jax grpo --config=configs/grpo.py:tiny,instructions --workdir=runs/grpo_instructions
    python -m llama2_jax grpo --config=configs/grpo.py:7b --config.init_checkpoint=runs/rejection-7b \
        --config.grpo.helpfulness_rm=runs/rm-h-7b --config.grpo.safety_rm=runs/rm-s-7b --workdir=/data/runs/grpo-7b

GRPO is not in the Llama 2 paper: it is DeepSeekMath's (Shao et al. 2024, §4.1) PPO without a value
model, each prompt answered by a group of G samples whose rewards, less the group's mean and divided
by its standard deviation, are the advantages. Its values come from DeepSeekMath's RL setup (§4.2):
β 0.04 on the k3 KL to the reference, a policy learning rate of 1e-6, answers of up to 1024 tokens
and one gradient step per rollout mini-batch (`grpo.epochs` 1); the clip of 0.2 is the Llama 2
paper's PPO value. DeepSeekMath samples G = 64 answers per question; these choose G = 8, more
prompts per iteration for the same sampling, and keep the Llama 2 paper's PPO sizes: 512 answers
per iteration (64 prompts of 8) in mini-batches of 64, 200 iterations. The reward is the Llama 2
paper's combination of the helpfulness and safety reward models (`reward.combine`), or a
program's (`grpo.reward_fn`): the `instructions` variant rewards answers that follow the GAtt-style
instruction its prompts' first user turns end with (`llama2_jax.data.instructions:follows_instruction`,
1 or 0), on prompts that carry one: the bundled `shakespeare_instruction_prompts` for the CPU sizes,
a dataset of yours (`data.dataset`) for the paper's.

`tiny` starts from the README's rejection-sampling policy (runs/rejection) and scores with its reward
models (runs/reward_helpfulness, runs/reward_safety), as configs/ppo.py:tiny does, at PPO tiny's
learning rate 6e-5: 32 iterations of 64 answers (8 prompts of 8) in mini-batches of 16, answers of up
to 48 tokens, the frozen models in float32, a few minutes on two CPU cores. `--help` with this config
lists every key.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=6e-5, warmup_steps=0, steps=0, global_batch_size=16, seq_len=128),
    "small": Schedule(peak_lr=1e-5, warmup_steps=0, steps=0, global_batch_size=16, seq_len=256),
    **{size: Schedule(peak_lr=1e-6, warmup_steps=0, steps=0, global_batch_size=64, seq_len=4096)
       for size in ("7b", "13b", "34b", "70b")},
}
# The models each CPU size starts from and scores with: what the README's commands write for it.
DEMO_MODELS = {"tiny": ("runs/rejection", "runs/reward_helpfulness", "runs/reward_safety")}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size, _, variant = arg.partition(",")
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    if variant not in ("", "instructions"):
        raise ValueError(f"unknown GRPO variant {variant!r}; the one there is: instructions ({size},instructions)")
    cpu = size in CPU_SIZES
    config = base_config("grpo", size, SCHEDULES[size])
    policy, helpfulness_rm, safety_rm = DEMO_MODELS.get(size, ("", "", ""))
    config.init_checkpoint = policy
    config.optimizer.end_lr_fraction = 1.0  # a constant learning rate
    config.data.dataset = "shakespeare_prompts" if cpu else "rlhf_prompts"
    config.train.eval_every = 32 if cpu else 50  # steps: every 8 iterations of tiny
    config.train.checkpoint_every = 32 if cpu else 50
    config.grpo = ml_collections.ConfigDict(dict(
        group_size=8,
        rollouts=64 if cpu else 512,
        iterations=32 if cpu else 200,
        epochs=1,
        kl_coef=0.04,
        clip=0.2,
        scale_rewards=True,
        reward_fn="",
        helpfulness_rm=helpfulness_rm,
        safety_rm=safety_rm,
        temperature=1.0,
        max_new_tokens=48 if cpu else 1024,
        frozen_dtype="float32" if cpu else "bfloat16",
        batch_size=64 if cpu else 512,
        score_batch_size=64,
        eval_prompts=200 if cpu else 0,
        early_stop_kl=0.0,
        patience=0,
    ))
    if variant == "instructions":
        config.grpo.reward_fn = "llama2_jax.data.instructions:follows_instruction"
        config.data.dataset = "shakespeare_instruction_prompts" if cpu else "instruction_prompts"
    return config
