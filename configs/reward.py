"""Reward-model configs: `get_config("SIZE")` for the helpfulness model, `get_config("SIZE,safety")`
for the safety model; SIZE is tiny, small, 7b, 13b, 34b or 70b.

    python -m llama2_jax reward --config=configs/reward.py:tiny --workdir=runs/reward
    python -m llama2_jax reward --config=configs/reward.py:tiny,safety --workdir=runs/reward_safety
    python -m llama2_jax reward --config=configs/reward.py:7b --config.init_checkpoint=runs/sft-7b \
        --workdir=/data/runs/reward-7b

The paper's sizes carry the paper's recipe (docs/recipe.md): from the chat model, 1 epoch, peak LR
1e-5 (5e-6 for 70B), cosine to 10 % of peak, warmup 3 % of the steps (at least 5), batches of 512
pairs, the `small` margin table (which table the final models use is open). Their data is the
paper's mix, as shares of the pairs drawn (`reward.mix` None: the companions of data.dataset,
llama2_jax/data/companions.py; a data.dataset of your own, or files in data.paths, train alone unless
`reward.mix` names datasets to mix in):

    helpfulness  meta_helpfulness 0.5, meta_safety 0.25, open_helpfulness 0.125, anthropic_harmless 0.125
    safety       meta_safety 0.45, anthropic_harmless 0.45, meta_helpfulness 0.05, open_helpfulness 0.05

that is, all helpfulness data plus as much again from the safety and open-source data, and all
safety data plus Anthropic Harmless mixed 90/10 with helpfulness data. For both models, pairs with an
unsafe chosen and a safe rejected answer are dropped from every dataset that carries safety labels
(`reward.safety_rule`); the safety model adds the binary safe/unsafe loss of A.3.4
(`reward.safety_aux_weight` 1). Within each group the paper samples in proportion to the
datasets' sizes; set the shares to yours. Build each dataset from JSONL preference pairs (llama2_jax/data/records.py reads `prompt`/`chosen`/`rejected`/`rating`/
`chosen_safe`/`rejected_safe`, or Anthropic HH transcripts) with a held-out split:

    python -m llama2_jax data build --name meta_helpfulness --format preferences \
        --input helpfulness/*.jsonl --holdout-fraction 0.02

(open_helpfulness: Anthropic Helpful, OpenAI Summarize and WebGPT, StackExchange, SHP, synthetic
GPT-J pairs). Open-source pairs carry no rating and train with margin 0. `tiny` learns the bundled
demo pairs (shakespeare_helpfulness, shakespeare_safety, split and mixed the same way) from the model
the README's SFT command writes (runs/sft) in a few minutes on two CPU cores. `--help` with this config lists every key.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=1e-4, warmup_steps=5, steps=0, global_batch_size=32, seq_len=128, epochs=1.0),
    "small": Schedule(peak_lr=5e-5, warmup_steps=5, steps=0, global_batch_size=32, seq_len=256, epochs=1.0),
    **{size: Schedule(peak_lr=5e-6 if size == "70b" else 1e-5, warmup_steps=5, steps=0, global_batch_size=512,
                      seq_len=4096, epochs=1.0)
       for size in ("7b", "13b", "34b", "70b")},
}
# model: (data.dataset, the safety auxiliary loss's weight). The datasets mixed in are data.dataset's
# companions (llama2_jax/data/companions.py), so they follow the data, not the config.
PAPER_DATA = {"helpfulness": ("meta_helpfulness", 0.0), "safety": ("meta_safety", 1.0)}
DEMO_DATA = {"helpfulness": ("shakespeare_helpfulness", 0.0), "safety": ("shakespeare_safety", 1.0)}
# The fine-tuning run each CPU size starts from: what `python -m llama2_jax sft` writes for it.
DEMO_INIT = {"tiny": "runs/sft"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size, _, model = arg.partition(",")
    model = model or "helpfulness"
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    if model not in PAPER_DATA:
        raise ValueError(f"unknown reward model {model!r}; choose one of {', '.join(PAPER_DATA)} (e.g. {size},safety)")
    config = base_config("reward", size, SCHEDULES[size])
    config.init_checkpoint = DEMO_INIT.get(size, "")
    config.optimizer.warmup_fraction = 0.03
    dataset, safety_aux_weight = (DEMO_DATA if size in CPU_SIZES else PAPER_DATA)[model]
    config.data.dataset = dataset
    if size in CPU_SIZES:
        config.train.eval_every = 50
        config.train.eval_steps = 0  # the whole held-out split
        config.train.checkpoint_every = 100
    config.reward = ml_collections.ConfigDict(dict(
        margin="small", centering=0.0, safety_rule=True, safety_aux_weight=safety_aux_weight, mix=None))
    return config
