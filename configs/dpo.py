"""DPO configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b.

    python -m llama2_jax dpo --config=configs/dpo.py:tiny --workdir=runs/dpo
    python -m llama2_jax dpo --config=configs/dpo.py:7b --config.init_checkpoint=runs/sft-7b \
        --workdir=/data/runs/dpo-7b

DPO is not in the Llama 2 paper: it trains the policy on the preference pairs the paper trains its
reward models on, without a reward model. The paper's sizes take the helpfulness reward model's data
mix (configs/reward.py: meta_helpfulness with as much again from the safety and open-source data),
its safety rule and its `small` margin table, and the DPO paper's settings (β 0.1, learning rate
1e-6, batches of 64 pairs, one epoch) with this package's AdamW, a 3 % warmup and cosine to 10 %.
`tiny` starts from the README's SFT model (runs/sft) and trains on the bundled demo pairs
(shakespeare_helpfulness with half as many again from shakespeare_safety) for a fifth of an epoch
at a learning rate of 1e-5, in a few minutes on two CPU cores. Pairs of your own (data.paths, or
a data.dataset that is neither the demo's nor the paper's) train alone unless `dpo.mix` names
datasets to mix in. `--help` with this config lists every key.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=1e-5, warmup_steps=5, steps=0, global_batch_size=32, seq_len=128, epochs=0.2),
    "small": Schedule(peak_lr=5e-6, warmup_steps=5, steps=0, global_batch_size=32, seq_len=256, epochs=0.5),
    **{size: Schedule(peak_lr=1e-6, warmup_steps=5, steps=0, global_batch_size=64, seq_len=4096, epochs=1.0)
       for size in ("7b", "13b", "34b", "70b")},
}
# The datasets mixed in are data.dataset's companions (`dpo.mix` None, llama2_jax/data/companions.py).
PAPER_DATA, DEMO_DATA = "meta_helpfulness", "shakespeare_helpfulness"
DEMO_INIT = {"tiny": "runs/sft"}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    cpu = size in CPU_SIZES
    config = base_config("dpo", size, SCHEDULES[size])
    config.init_checkpoint = DEMO_INIT.get(size, "")
    config.optimizer.warmup_fraction = 0.03
    config.data.dataset = DEMO_DATA if cpu else PAPER_DATA
    if cpu:
        config.train.eval_every = 20
        config.train.eval_steps = 0  # the whole held-out split
        config.train.checkpoint_every = 20
    config.dpo = ml_collections.ConfigDict(dict(
        reference="", beta=0.1, loss="sigmoid", margin="small", safety_rule=True, mix=None,
        frozen_dtype="float32" if cpu else "bfloat16"))
    return config
