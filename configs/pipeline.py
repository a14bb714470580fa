"""The whole Llama 2-Chat recipe in one command: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b,
34b, 70b.

    python -m llama2_jax pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline
    python -m llama2_jax pipeline --config=configs/pipeline.py:7b --workdir=/gcs/BUCKET/llama2-7b --dry-run

The stages, in the paper's order, each in its own subdirectory of the workdir and started from the
one before it (llama2_jax/recipe/steps.py):

    pretrain            configs/pretrain.py                 the base model
    sft                 configs/sft.py                      from pretrain
    reward_helpfulness  configs/reward.py                   from sft
    reward_safety       configs/reward.py:SIZE,safety       from sft
    rejection           configs/rejection.py                from sft, scored by both reward models
    gatt_data           `gatt` flags                        sampled from rejection, reranked by both
    gatt                configs/sft.py:SIZE,gatt            rejection fine-tuned on gatt_data
    distill_data        `distill` flags                     gatt's answers under a safety preprompt,
                                                            kept where the safety RM scores them safer
    distill             configs/sft.py:SIZE,gatt (its data  gatt fine-tuned on distill_data
                        replaced)
    ppo                 configs/ppo.py                      from distill, both reward models
    evaluate            `eval` and `compare` flags          perplexity and the next-line task of
                                                            pretrain and ppo; every policy's held-out
                                                            reward and KL to sft
    chat                `generate` flags                    ppo answers a few held-out prompts

Each stage's section is that stage's own config (every key of it overridable:
`--config.sft.optimizer.peak_lr=1e-5`), or the flags of the command it runs. A path the pipeline
fills (an `init_checkpoint`, a reward model, the GAtt and distillation dialogs) is empty here; set
it to start a stage from something else (`--config.sft.init_checkpoint=llama-2-7b/` with
`--config.stages=sft,...` skips pretraining for Meta's weights).

`tiny` shortens every stage's schedule so that the whole recipe runs in about 20 minutes on two CPU
cores; the stages' own commands keep their longer ones (README, "The recipe on the bundled demo").
The paper's sizes carry each stage's paper settings as its config file has them; their data are the
datasets those configs name, built beforehand (`python -m llama2_jax data build`, docs/recipe.md),
and the GAtt dialogs, distillation prompts and held-out prompts are files of yours
(`--config.gatt_data.dialogs=...`).
"""

import os

import ml_collections

from llama2_jax.config_cli import load_config_file
from llama2_jax.data.config import DEMO_DATA_DIR
from llama2_jax.recipe.steps import set_key
from llama2_jax.train.config import CPU_SIZES

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
SIZES = ("tiny", "small", "7b", "13b", "34b", "70b")

# stage section: (config file in configs/, its argument after the size)
STAGE_CONFIGS = {
    "pretrain": ("pretrain.py", ""),
    "sft": ("sft.py", ""),
    "reward_helpfulness": ("reward.py", ""),
    "reward_safety": ("reward.py", ",safety"),
    "rejection": ("rejection.py", ""),
    "gatt": ("sft.py", ",gatt"),
    "distill": ("sft.py", ",gatt"),
    "ppo": ("ppo.py", ""),
}
# The paths the pipeline fills from the stages before (emptied here).
FILLED = {
    "sft": ("init_checkpoint",), "reward_helpfulness": ("init_checkpoint",), "reward_safety": ("init_checkpoint",),
    "rejection": ("init_checkpoint", "rejection.helpfulness_rm", "rejection.safety_rm"),
    "gatt": ("init_checkpoint", "data.paths"), "distill": ("init_checkpoint", "data.paths"),
    "ppo": ("init_checkpoint", "ppo.helpfulness_rm", "ppo.safety_rm"),
}
# tiny: each stage's schedule shortened to fit the whole recipe in about 20 minutes on two CPU cores.
TINY_SCHEDULES = {
    "pretrain": {"train.steps": 250},
    "sft": {"train.epochs": 1.0, "train.eval_every": 1000},
    "reward_helpfulness": {"train.epochs": 0.2, "train.eval_every": 1000},
    "reward_safety": {"train.epochs": 0.5, "train.eval_every": 1000},
    "rejection": {"rejection.rounds": 1},
    "ppo": {"ppo.iterations": 12},
}


def stage_config(name: str, size: str) -> ml_collections.ConfigDict:
    file_name, variant = STAGE_CONFIGS[name]
    config = load_config_file(f"{os.path.join(CONFIG_DIR, file_name)}:{size}{variant}")
    for key in FILLED.get(name, ()):
        set_key(config, key, () if isinstance(config[key], tuple) else "")
    if name == "distill":  # the GAtt round's schedule, on the distilled dialogs
        config.data.dataset = "distilled_dialogs"
    if size == "tiny":
        for key, value in TINY_SCHEDULES.get(name, {}).items():
            set_key(config, key, value)
    return config


# tiny,quick: every stage a few steps of a two-layer model (pretraining's, which every later stage
# starts from), to see the whole chain run in minutes (the figures show the mechanics, not
# learning). The GAtt and distillation rounds train on the bundled held-out dialogs, since so short
# a policy follows no instruction yet (their data steps still run); rejection sampling, PPO and the
# evaluation read the 200 held-out demo prompts.
QUICK_FINE_TUNING = {"train.steps": 2, "train.eval_every": 1000, "train.eval_steps": 1,
                     "train.seq_len": 64, "train.global_batch_size": 8}
QUICK = {
    "pretrain": {"model.n_layers": 2, "train.steps": 4, "train.seq_len": 64, "train.eval_every": 4,
                 "train.eval_steps": 1, "train.sample_length": 0, "train.eval_tasks": ()},
    **{name: QUICK_FINE_TUNING for name in ("sft", "reward_helpfulness", "reward_safety", "gatt", "distill")},
    **{f"{name}.sft.eval_prompts": 1 for name in ("sft", "gatt", "distill")},
    **{f"{name}.data.paths": (str(DEMO_DATA_DIR / "dialogs_validation.jsonl"),) for name in ("gatt", "distill")},
    "rejection": {**QUICK_FINE_TUNING, "train.eval_every": 0, "rejection.rounds": 1, "rejection.samples": 2,
                  "rejection.max_new_tokens": 6, "rejection.eval_prompts": 8},
    "ppo": {"train.global_batch_size": 8, "train.eval_every": 2, "train.checkpoint_every": 1,
            "ppo.iterations": 2, "ppo.rollouts": 16, "ppo.max_new_tokens": 6, "ppo.eval_prompts": 8,
            "ppo.batch_size": 8},
    "gatt_data": {"limit": 2, "samples": 2, "answer_tokens": 6},
    "distill_data": {"limit": 8, "answer_tokens": 6},
    **{f"{name}.data": {"dataset": "quick_prompts", "format": "prompts", "holdout_fraction": 0.3,
                         "paths": (str(DEMO_DATA_DIR / "prompts_validation.jsonl"),)} for name in ("rejection", "ppo")},
    "evaluate": {"answer_tokens": 6, "instructions": "", "dataset": "",
                 "prompts": str(DEMO_DATA_DIR / "prompts_validation.jsonl")},
    "chat": {"count": 2, "max_new_tokens": 6},
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size, _, variant = arg.partition(",")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if variant not in ("", "quick") or (variant and size not in CPU_SIZES):
        raise ValueError(f"unknown pipeline variant {arg!r}; the one there is: quick (tiny,quick or small,quick)")
    demo = size in CPU_SIZES
    config = ml_collections.ConfigDict()
    config.size = size
    config.stages = ""  # a comma-separated subset to run (llama2_jax/recipe/steps.py names them); empty: all
    config.config_files = ml_collections.ConfigDict({name: f"{os.path.join(CONFIG_DIR, file_name)}:{size}{variant}"
                                                     for name, (file_name, variant) in STAGE_CONFIGS.items()})
    for name in ("pretrain", "sft", "reward_helpfulness", "reward_safety", "rejection"):
        config[name] = stage_config(name, size)
    config.gatt_data = ml_collections.ConfigDict(dict(
        dialogs=str(DEMO_DATA_DIR / "gatt_dialogs_train.jsonl") if demo else "",
        # After SFT's one epoch the tiny policy follows an instruction in a few answers of a hundred:
        # eight samples per turn find some.
        limit=100 if size == "tiny" else 0, samples=8 if size == "tiny" else 4,
        answer_tokens=48 if demo else 512, seed=0))
    config.gatt = stage_config("gatt", size)
    config.distill_data = ml_collections.ConfigDict(dict(
        prompts=str(DEMO_DATA_DIR / "safety_pairs_train.jsonl") if demo else "",
        limit=200 if size == "tiny" else 0, answer_tokens=48 if demo else 512, seed=0))
    config.distill = stage_config("distill", size)
    config.ppo = stage_config("ppo", size)
    config.evaluate = ml_collections.ConfigDict(dict(
        dataset="shakespeare:validation" if demo else "",
        task=str(DEMO_DATA_DIR / "next_line_choice.jsonl") if demo else "",
        prompts="shakespeare_prompts:validation" if demo else "rlhf_prompts:validation",
        instructions="shakespeare_instruction_prompts:validation" if demo else "",
        answer_tokens=48 if demo else 1024))
    config.chat = ml_collections.ConfigDict(dict(
        prompts=str(DEMO_DATA_DIR / "prompts_validation.jsonl") if demo else "",
        count=4, max_new_tokens=48 if demo else 512))
    if variant == "quick":
        for section, values in QUICK.items():
            name, _, prefix = section.partition(".")
            for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
                set_key(config[name], ".".join(part for part in (prefix, key) if part), value)
    return config
