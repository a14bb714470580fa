"""Pretraining configs: `get_config("tiny" | "small" | "7b" | "13b" | "34b" | "70b")`.

    python -m llama2_jax train --config=configs/pretrain.py:tiny --workdir=runs/tiny \
        --config.train.steps=600 --config.optimizer.peak_lr=3e-3

The paper sizes carry the paper's recipe (PAPER.md): AdamW (0.9, 0.95, eps 1e-5, weight decay
0.1), clipping at 1.0, 2000 warmup steps, cosine to 10 % of peak, peak 3e-4 (7B, 13B) or 1.5e-4
(34B, 70B), 4M-token batches (1024 × 4096) for 2T tokens. `tiny` and `small` learn the bundled
Shakespeare corpus on a laptop CPU (tiny: a few minutes on two cores).
"""

import dataclasses

import ml_collections

from llama2_jax.data.config import default_data_config
from llama2_jax.model.config import LlamaConfig
from llama2_jax.sharding import DEFAULT_RULES
from llama2_jax.train.optim import PAPER_OPTIMIZER

PAPER_TOKENS = 2_000_000_000_000
PAPER_BATCH, PAPER_SEQ_LEN = 1024, 4096

# size: (peak_lr, warmup_steps, steps, global_batch_size, seq_len)
SCHEDULES = {
    "tiny": (3e-3, 30, 500, 16, 128),
    "small": (1e-3, 100, 2000, 32, 256),
    "7b": (3e-4, 2000, PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN), PAPER_BATCH, PAPER_SEQ_LEN),
    "13b": (3e-4, 2000, PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN), PAPER_BATCH, PAPER_SEQ_LEN),
    "34b": (1.5e-4, 2000, PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN), PAPER_BATCH, PAPER_SEQ_LEN),
    "70b": (1.5e-4, 2000, PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN), PAPER_BATCH, PAPER_SEQ_LEN),
}
CPU_SIZES = ("tiny", "small")


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SCHEDULES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SCHEDULES)}")
    peak_lr, warmup_steps, steps, global_batch_size, seq_len = SCHEDULES[size]
    config = ml_collections.ConfigDict()

    # The LlamaConfig fields (llama2_jax/model/config.py), starting from the named preset.
    model = LlamaConfig.from_preset(size)
    if size in CPU_SIZES:
        # bfloat16 matmuls are emulated on CPU and run several times slower than float32.
        model = model.replace(compute_dtype="float32")
    else:
        # The paper's models need remat to fit a useful batch per chip.
        model = model.replace(remat="minimal")
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))

    # Devices per mesh axis within a slice (ici_*) and across slices (dcn_*); one -1 is filled in.
    config.mesh = ml_collections.ConfigDict(
        dict(ici_data=1, ici_fsdp=-1, ici_tensor=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1)
    )
    if size in CPU_SIZES:
        config.mesh.ici_fsdp, config.mesh.ici_data = 1, -1
    # Logical axis -> mesh axes (llama2_jax/sharding.py); first rule that fits wins.
    config.rules = DEFAULT_RULES

    # AdamW + clipping + warmup/cosine (llama2_jax/train/optim.py PAPER_OPTIMIZER explains each key).
    # decay_steps 0 means train.steps; fix it to stop a run early and extend it later (N steps,
    # then train.steps=2N) on the same schedule as one 2N-step run.
    config.optimizer = ml_collections.ConfigDict(PAPER_OPTIMIZER)
    config.optimizer.peak_lr = peak_lr
    config.optimizer.warmup_steps = warmup_steps
    # Micro-batches per optimizer step (global_batch_size is split into this many, inside the step).
    config.optimizer.grad_accum_steps = 1

    config.train = ml_collections.ConfigDict()
    config.train.steps = steps  # optimizer steps; also the length of the cosine schedule
    config.train.global_batch_size = global_batch_size  # sequences per optimizer step, all hosts
    config.train.seq_len = seq_len
    config.train.seed = 0  # parameter init and data order
    config.train.log_every = 10 if size in CPU_SIZES else 50
    config.train.eval_every = 100 if size in CPU_SIZES else 1000  # 0: never
    config.train.eval_steps = 8  # batches per evaluation
    config.train.checkpoint_every = 100 if size in CPU_SIZES else 1000
    config.train.keep_checkpoints = 3
    config.train.z_loss_weight = 0.0  # PaLM's z-loss on log Z², off in the paper's recipe
    # FLOP/s of one device for MFU; 0: look the device kind up (none known for CPU: no MFU).
    config.train.peak_flops = 0.0
    # Printed with a sample from the model when pretraining ends ("" or length 0: no sample).
    config.train.sample_prompt = "ROMEO:" if size in CPU_SIZES else ""
    config.train.sample_length = 64

    # Dataset, tokenizer and loading (llama2_jax/data/config.py).
    config.data = default_data_config()
    return config
