"""REINFORCE++ configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b, and
`get_config("SIZE,instructions")` for a program reward on instruction following.

    python -m llama2_jax reinforce_pp --config=configs/reinforce_pp.py:tiny --workdir=runs/reinforce_pp
    python -m llama2_jax reinforce_pp --config=configs/reinforce_pp.py:7b \
        --config.init_checkpoint=runs/rejection-7b --config.reinforce_pp.helpfulness_rm=runs/rm-h-7b \
        --config.reinforce_pp.safety_rm=runs/rm-s-7b --workdir=/data/runs/reinforce_pp-7b

REINFORCE++ is not in the Llama 2 paper: it is Hu's (2025) PPO without a value model, the KL to the
reference as a per-token penalty in the reward (β 0.01, its reference setting) and the advantages
normalised over the whole batch. One answer per prompt, as it samples; the rest follows
configs/grpo.py, so the algorithms compare on the same prompts, reward models, learning rate and
sizes: 512 answers per iteration in mini-batches of 64, 200 iterations for the paper's sizes; `tiny`
starts from the README's rejection-sampling policy and reward models, 32 iterations of 64 answers in
mini-batches of 16, a few minutes on two CPU cores. `--help` with this config lists every key.
"""

import os

import ml_collections

from llama2_jax.config_cli import load_config_file


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = load_config_file(f"{os.path.join(os.path.dirname(__file__), 'grpo.py')}:{arg}")
    config.stage = "reinforce_pp"
    section = config.grpo
    del config["grpo"]
    del section["scale_rewards"]
    section.group_size = 1
    section.kl_coef = 0.01
    config.reinforce_pp = section
    return config
