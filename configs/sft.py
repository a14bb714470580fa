"""Supervised fine-tuning configs: `get_config("SIZE")`, SIZE one of tiny, small, 7b, 13b, 34b, 70b, and
`get_config("SIZE,gatt")` for the Ghost Attention round that follows it.

    python -m llama2_jax sft --config=configs/sft.py:tiny --workdir=runs/sft
    python -m llama2_jax gatt --checkpoint runs/rejection --reward-models runs/reward_helpfulness \
        runs/reward_safety --out runs/gatt_dialogs.jsonl
    python -m llama2_jax sft --config=configs/sft.py:tiny,gatt --workdir=runs/gatt
    python -m llama2_jax sft --config=configs/sft.py:7b --config.init_checkpoint=llama-2-7b/ \
        --config.data.dataset=my_dialogs --workdir=/data/runs/sft-7b

The paper's sizes carry the paper's recipe (docs/recipe.md): from the pretrained model, cosine
schedule with peak 2e-5 and weight decay 0.1, batches of 64 sequences of 4096 tokens, 2 epochs, the
loss on the answers only. The warmup (3 % of the steps, at least 5) is not in the paper. `tiny`
learns the bundled demo dialogs from the model the README's first command trains (runs/tiny) in a
few minutes on two CPU cores. The `gatt` round comes, as in the paper, after RLHF: it starts from
the rejection-sampling policy (runs/rejection) and trains on the Ghost Attention dialogs
`python -m llama2_jax gatt` samples from it, reranked by both reward models
(runs/gatt_dialogs.jsonl), a few epochs at a lower rate. `--help` with this config lists every key and what it means.
"""

import ml_collections

from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

SCHEDULES = {
    "tiny": Schedule(peak_lr=1e-3, warmup_steps=5, steps=0, global_batch_size=16, seq_len=256, epochs=2.0),
    "small": Schedule(peak_lr=5e-4, warmup_steps=5, steps=0, global_batch_size=16, seq_len=512, epochs=2.0),
    **{size: Schedule(peak_lr=2e-5, warmup_steps=5, steps=0, global_batch_size=64, seq_len=4096, epochs=2.0)
       for size in ("7b", "13b", "34b", "70b")},
}
# The pretraining run each CPU size starts from: what `python -m llama2_jax train` writes for it.
DEMO_INIT = {"tiny": "runs/tiny", "small": "runs/small"}
# The Ghost Attention round: from the newest RLHF policy, on what `python -m llama2_jax gatt` wrote from it.
GATT_INIT, GATT_DIALOGS = "runs/rejection", "runs/gatt_dialogs.jsonl"
GATT_EPOCHS, GATT_LR_SCALE = 6.0, 0.5


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size, _, round_ = arg.partition(",")
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    if round_ not in ("", "gatt"):
        raise ValueError(f"unknown SFT round {round_!r}; the one there is: gatt ({size},gatt)")
    config = base_config("sft", size, SCHEDULES[size])
    config.init_checkpoint = DEMO_INIT.get(size, "")
    config.optimizer.warmup_fraction = 0.03
    # The paper's 27,540 annotated dialogs are Meta's: at its sizes the dialogs are yours to give.
    config.data.dataset = "shakespeare_dialogs" if size in CPU_SIZES else ""
    if size in CPU_SIZES:
        config.train.eval_every = 50
        config.train.eval_steps = 0  # the whole held-out split
        config.train.checkpoint_every = 50
    config.sft = ml_collections.ConfigDict(dict(eval_prompts=8, answer_tokens=64))
    if round_ == "gatt":
        config.init_checkpoint = GATT_INIT if size in CPU_SIZES else ""
        config.data.update(dict(dataset="gatt_dialogs", paths=(GATT_DIALOGS,), format="chat", holdout_fraction=0.05))
        config.train.epochs = GATT_EPOCHS
        config.optimizer.peak_lr *= GATT_LR_SCALE
        if size in CPU_SIZES:
            config.train.eval_every = 20
    return config
