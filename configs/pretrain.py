"""Pretraining configs: `get_config("tiny" | "small" | "7b" | "13b" | "34b" | "70b")`.

    python -m llama2_jax train --config=configs/pretrain.py:tiny --workdir=runs/tiny \
        --config.train.steps=600 --config.optimizer.peak_lr=3e-3

The paper's sizes carry the paper's recipe (docs/recipe.md): AdamW (0.9, 0.95, eps 1e-5, weight
decay 0.1), clipping at 1.0, 2000 warmup steps, cosine to 10 % of peak, peak 3e-4 (7B, 13B) or
1.5e-4 (34B, 70B), 4M-token batches (1024 × 4096) for 2T tokens. The paper's corpus is Meta's: give yours as
`--config.data.dataset` (a dataset prepared with `python -m llama2_jax data build`) or
`--config.data.paths`. `tiny` and `small` learn the bundled Shakespeare corpus on a laptop CPU
(tiny: 3 to 4 minutes on two idle cores).
`--help` with this config lists every key, its value and what it means.
"""

import ml_collections

from llama2_jax.data.config import DEMO_DATA_DIR
from llama2_jax.train.config import CPU_SIZES, Schedule, base_config

PAPER_TOKENS = 2_000_000_000_000
PAPER_BATCH, PAPER_SEQ_LEN = 1024, 4096
PAPER_STEPS = PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN)

SCHEDULES = {
    "tiny": Schedule(peak_lr=3e-3, warmup_steps=30, steps=500, global_batch_size=8, seq_len=256),
    "small": Schedule(peak_lr=1e-3, warmup_steps=100, steps=2000, global_batch_size=32, seq_len=256),
    **{size: Schedule(peak_lr=peak_lr, warmup_steps=2000, steps=PAPER_STEPS, global_batch_size=PAPER_BATCH,
                      seq_len=PAPER_SEQ_LEN)
       for size, peak_lr in (("7b", 3e-4), ("13b", 3e-4), ("34b", 1.5e-4), ("70b", 1.5e-4))},
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    config = base_config("pretrain", size, SCHEDULES[size])
    if size in CPU_SIZES:  # the bundled multiple-choice task: real next lines against shuffled ones
        config.train.eval_tasks = (str(DEMO_DATA_DIR / "next_line_choice.jsonl"),)
    if size not in CPU_SIZES:
        config.data.dataset = ""  # the paper's 2T tokens are Meta's: the corpus is yours to give
    config.train.sample_prompt = "ROMEO:" if size in CPU_SIZES else ""
    config.train.sample_length = 64
    return config
