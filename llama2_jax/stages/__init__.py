"""The stages of the recipe, one module each: its `Task` for the one training loop and its `run`.

    pretrain.py   next-token prediction on packed documents          (python -m llama2_jax train)
    sft.py        supervised fine-tuning on dialogs, answers only     (python -m llama2_jax sft)
    reward.py     reward models on preference pairs, ranking loss     (python -m llama2_jax reward)
    rejection.py  rejection-sampling fine-tuning: rounds of sampling, scoring by the reward models,
                  the best answers pooled and fine-tuned on          (python -m llama2_jax rejection)
    ppo.py        PPO: rollouts of the current policy scored by both reward models, clipped policy and
                  value losses, the policy and value model trained together  (python -m llama2_jax ppo)
    grpo.py       GRPO (DeepSeekMath, not in the paper): groups of answers per prompt, advantages
                  relative to the group, no value model              (python -m llama2_jax grpo)
    rloo.py       RLOO (Ahmadian et al. 2024): K answers per prompt, leave-one-out baselines
                                                                     (python -m llama2_jax rloo)
    reinforce_pp.py  REINFORCE++ (Hu 2025): token-level KL in the reward, advantages normalised over
                  the batch                                          (python -m llama2_jax reinforce_pp)
    dpo.py        DPO: the policy on preference pairs against a frozen reference     (python -m llama2_jax dpo)

What the stages share, none of them a stage:

    initial.py    how a fine-tuning stage starts from a checkpoint: its tokenizer, shape, weights
    next_token.py the next-token tasks: pretraining's, and SFT's answer-only one (rejection sampling's too)
    on_policy.py  the on-policy stage PPO, GRPO, RLOO and REINFORCE++ are algorithms of: its loop,
                  resume, evaluation, export; an algorithm is its advantages, its loss and its keys

No stage imports another: what two stages need is in one of these, or below them (llama2_jax/rollout/
for sampling and scoring, llama2_jax/train/ for the loop and the losses).

A stage module defines `STAGE` (the name its configs carry in `config.stage`), `CONFIG_DOCS` (what
its own config keys mean), `make_task(config, ...) -> Task` (cheap: no data or weights read, so
`aot` and `bench` can build any stage's step) and `run(config, workdir)`, what its command does.
`STAGES` below is the one table that names them: the command line, `aot` and the config help all
find a stage through it.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from llama2_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    command: str  # python -m llama2_jax <command>
    module: str
    summary: str


# config.stage -> the stage's command, module and what it does.
STAGES = {
    "pretrain": Stage("train", "llama2_jax.stages.pretrain", "pretrain a model on text (configs/pretrain.py)"),
    "sft": Stage("sft", "llama2_jax.stages.sft", "fine-tune on dialogs, the loss on the answers (configs/sft.py)"),
    "reward": Stage("reward", "llama2_jax.stages.reward",
                    "train a helpfulness or safety reward model on preference pairs (configs/reward.py)"),
    "rejection": Stage("rejection", "llama2_jax.stages.rejection",
                       "fine-tune on the best of K answers by both reward models, over rounds "
                       "(configs/rejection.py)"),
    "ppo": Stage("ppo", "llama2_jax.stages.ppo",
                 "PPO with both reward models and a KL to the starting policy (configs/ppo.py)"),
    "grpo": Stage("grpo", "llama2_jax.stages.grpo",
                  "GRPO: groups of answers per prompt, group-relative rewards, no value model (configs/grpo.py)"),
    "rloo": Stage("rloo", "llama2_jax.stages.rloo",
                  "RLOO: K answers per prompt, each one's baseline the others' mean reward (configs/rloo.py)"),
    "reinforce_pp": Stage("reinforce_pp", "llama2_jax.stages.reinforce_pp",
                          "REINFORCE++: token-level KL, advantages normalised over the batch (configs/reinforce_pp.py)"),
    "dpo": Stage("dpo", "llama2_jax.stages.dpo",
                 "DPO on preference pairs against a frozen reference, no reward model (configs/dpo.py)"),
}


def stage_of(name: str) -> Stage:
    """The stage a config's `stage` names; a ConfigError listing the stages for any other name."""
    if name not in STAGES:
        raise ConfigError(f"the config's stage is {name!r}, which is none of the stages "
                          f"({', '.join(STAGES)}); fix `config.stage` in the config file")
    return STAGES[name]


def stage_module(name: str) -> ModuleType:
    """The module of the stage a config's `stage` names."""
    return importlib.import_module(stage_of(name).module)
