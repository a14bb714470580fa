"""RLOO configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b, and
`get_config("SIZE,instructions")` for a program reward on instruction following.

    python -m llama2_jax rloo --config=configs/rloo.py:tiny --workdir=runs/rloo
    python -m llama2_jax rloo --config=configs/rloo.py:7b --config.init_checkpoint=runs/rejection-7b \
        --config.rloo.helpfulness_rm=runs/rm-h-7b --config.rloo.safety_rm=runs/rm-s-7b --workdir=/data/runs/rloo-7b

RLOO is not in the Llama 2 paper: it is Ahmadian et al.'s (2024) REINFORCE with a leave-one-out
baseline over K answers per prompt. They find K = 4 a good trade of sampling for variance and keep
the KL to the reference in the reward (β 0.05 here, as trl's RLOO); the rest follows configs/grpo.py,
so the two compare on the same prompts, reward models, learning rate and sizes: 512 answers per
iteration (128 prompts of 4) in mini-batches of 64, 200 iterations for the paper's sizes; `tiny`
starts from the README's rejection-sampling policy and reward models, 32 iterations of 64 answers
(16 prompts of 4) in mini-batches of 16, a few minutes on two CPU cores. `--help` with this config
lists every key.
"""

import os

import ml_collections

from llama2_jax.config_cli import load_config_file


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = load_config_file(f"{os.path.join(os.path.dirname(__file__), 'grpo.py')}:{arg}")
    config.stage = "rloo"
    section = config.grpo
    del config["grpo"]
    del section["scale_rewards"]
    section.group_size = 4
    section.kl_coef = 0.05
    config.rloo = section
    return config
