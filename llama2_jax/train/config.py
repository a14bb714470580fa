"""The config sections every stage shares, and one line on what each key means.

    stage      the stage the config is for (a module of llama2_jax/stages/)
    model      the LlamaConfig fields: pretraining's from a named size; a stage that starts from a
               checkpoint takes the architecture from the checkpoint (stages/initial.py)
    mesh       devices per mesh axis
    rules      logical axis -> mesh axes
    optimizer  AdamW, clipping, warmup + cosine, gradient accumulation
    train      length, batch, cadence of logs, evaluations and checkpoints
    data       dataset, tokenizer and loading (llama2_jax/data/config.py)
    lora       low-rank adapters, in every stage after pretraining (llama2_jax/model/lora.py)

Config files in configs/ choose values for these keys and add their stage's own section (documented
in the stage module's `CONFIG_DOCS`). `python -m llama2_jax <stage> --config=FILE:SIZE --help`
prints every key with its value and its line from here.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from llama2_jax.data.config import DATA_DOCS, default_data_config
from llama2_jax.errors import ConfigError
from llama2_jax.model.config import ARCHITECTURE_FIELDS, LORA_TARGETS, LlamaConfig, lora_problems
from llama2_jax.sharding import DEFAULT_RULES
from llama2_jax.train.optim import PAPER_OPTIMIZER

# Presets small enough to train on a laptop CPU, where bfloat16 matmuls are emulated and slow.
CPU_SIZES = ("tiny", "small")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The values that differ between stages and sizes."""

    peak_lr: float
    warmup_steps: int
    steps: int
    global_batch_size: int
    seq_len: int
    epochs: float = 0.0


def base_config(stage: str, size: str, schedule: Schedule) -> ml_collections.ConfigDict:
    """Every shared section for model size `size` (a LlamaConfig preset)."""
    config = ml_collections.ConfigDict()
    config.stage = stage

    model = LlamaConfig.from_preset(size)
    if size in CPU_SIZES:
        model = model.replace(compute_dtype="float32")
    else:
        model = model.replace(remat="minimal")  # the paper's sizes need it to fit a useful batch
    # The adapters' settings are the `lora` section's (below), not the model's.
    config.model = ml_collections.ConfigDict({key: value for key, value in dataclasses.asdict(model).items()
                                              if not key.startswith("lora_")})
    if stage != "pretrain":
        # Every other stage starts from a checkpoint, and the checkpoint says what the model is: these
        # keys stay None until the stage fills them from it (a value set here must agree with it). The
        # size's shape is what `aot` and `bench` compile when there is no checkpoint to read.
        config.model.size = size
        for field in ARCHITECTURE_FIELDS:
            config.model[field] = config_dict.placeholder(float if field in FLOAT_FIELDS else int)

    config.mesh = ml_collections.ConfigDict(
        dict(ici_data=1, ici_fsdp=-1, ici_tensor=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1))
    if size in CPU_SIZES:
        config.mesh.ici_fsdp, config.mesh.ici_data = 1, -1
    config.rules = DEFAULT_RULES

    config.optimizer = ml_collections.ConfigDict(PAPER_OPTIMIZER)
    config.optimizer.peak_lr = schedule.peak_lr
    config.optimizer.warmup_steps = schedule.warmup_steps
    config.optimizer.grad_accum_steps = 1

    cpu = size in CPU_SIZES
    config.train = ml_collections.ConfigDict(dict(
        steps=schedule.steps, epochs=schedule.epochs, global_batch_size=schedule.global_batch_size,
        seq_len=schedule.seq_len, seed=0, log_every=10 if cpu else 50, eval_every=100 if cpu else 1000,
        eval_steps=8, eval_tasks=(), checkpoint_every=100 if cpu else 1000, keep_checkpoints=3, z_loss_weight=0.0,
        peak_flops=0.0,
    ))
    config.data = default_data_config()
    if stage != "pretrain":
        config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=LORA_TARGETS, base_dtype="",
                                                     dropout=0.0))
    return config


FLOAT_FIELDS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")

# A stage that starts from a checkpoint shows None for the architecture keys until it has read them there.
FROM_CHECKPOINT = "; None: init_checkpoint's (stages after pretraining; a value set must agree)"
MODEL_DOCS = {
    "size": "the size whose shape `aot` and `bench` compile when no init_checkpoint is there to read",
    "vocab_size": "tokens in the vocabulary (the tokenizer may have fewer, never more)",
    "dim": "model width",
    "n_layers": "transformer blocks",
    "n_heads": "query heads",
    "n_kv_heads": "key/value heads (grouped-query attention when fewer than n_heads)",
    "multiple_of": "Meta's FFN rounding: the hidden width is rounded up to a multiple of this",
    "ffn_dim_multiplier": "Meta's FFN scale before rounding (in pretraining, None is 1)",
    "norm_eps": "RMSNorm epsilon",
    "rope_theta": "RoPE base",
    "max_seq_len": "longest sequence the model is used with (context for sampling); may be set below a "
                   "checkpoint's, which is kept",
    "param_dtype": "storage dtype of the weights (float32 master weights for training)",
    "compute_dtype": "dtype of the matmuls; norms, softmax, logits and losses stay float32",
    "attention": "kernel: xla (everywhere), cudnn (GPU flash attention), splash (TPU Pallas)",
    "remat": "what the backward pass recomputes: none, minimal, save_dots, full",
}

KEY_DOCS = {
    "stage": "the stage this config is for (llama2_jax/stages/<stage>.py)",
    **{f"model.{key}": doc + (FROM_CHECKPOINT if key in ARCHITECTURE_FIELDS else "")
       for key, doc in MODEL_DOCS.items()},
    "mesh.ici_data": "devices on the data axis within a slice (-1: the rest)",
    "mesh.ici_fsdp": "devices on the fsdp axis within a slice: parameters and optimizer state sharded",
    "mesh.ici_tensor": "devices on the tensor axis within a slice: heads, MLP and vocabulary split",
    "mesh.dcn_data": "slices on the data axis (-1: all slices)",
    "mesh.dcn_fsdp": "slices on the fsdp axis",
    "mesh.dcn_tensor": "slices on the tensor axis",
    "rules": "logical axis -> mesh axes; the first rule whose mesh axes are free wins",
    "optimizer.peak_lr": "learning rate at the end of warmup",
    "optimizer.end_lr_fraction": "the cosine decays to this fraction of peak_lr",
    "optimizer.warmup_steps": "linear warmup from 0, in steps (at least this many)",
    "optimizer.warmup_fraction": "the warmup is at least this share of the schedule's steps",
    "optimizer.decay_steps": "length of warmup + cosine; 0: the run's length, kept when a finished run "
                             "is extended (set it to stretch the schedule)",
    "optimizer.b1": "AdamW beta1",
    "optimizer.b2": "AdamW beta2",
    "optimizer.eps": "AdamW epsilon",
    "optimizer.weight_decay": "AdamW weight decay, on every parameter except norm scales",
    "optimizer.clip_norm": "global gradient norm clip",
    "optimizer.grad_accum_steps": "micro-batches per optimizer step (global_batch_size is split in the step)",
    "train.steps": "optimizer steps (0: from train.epochs)",
    "train.epochs": "passes over the training set when train.steps is 0",
    "train.global_batch_size": "rows per optimizer step, all hosts together",
    "train.seq_len": "tokens per row",
    "train.seed": "parameter initialisation and data order",
    "train.log_every": "steps between logged metrics",
    "train.eval_every": "steps between evaluations on the held-out split (0: never)",
    "train.eval_steps": "batches per evaluation (0: the whole held-out split)",
    "train.eval_tasks": "multiple-choice task files (JSON lines: context, choices, answer) scored at every "
                        "evaluation, logged as eval_<file stem>_accuracy",
    "train.checkpoint_every": "steps between checkpoints",
    "train.keep_checkpoints": "newest checkpoints kept",
    "train.z_loss_weight": "PaLM's z-loss on log Z^2 (0: off, as in the paper)",
    "train.peak_flops": "FLOP/s of one device for MFU (0: looked up from the device kind)",
    "lora.rank": "rank of the low-rank adapters trained in place of every weight (0: none, every weight trains)",
    "lora.alpha": "the adapters' scale is alpha / rank",
    "lora.targets": "the weights that get adapters: attention's q, k, v, o and the MLP's gate, up, down",
    "lora.base_dtype": "storage dtype of the frozen base under adapters (empty: the compute dtype; int8 or int4: "
                       "QLoRA, the blocks' projections quantized, model/quantize.py)",
    "lora.dropout": "share of each adapter's input dropped in training steps (0: none; not in PPO or GRPO, whose "
                    "ratios compare the training forward pass with the rollout's)",
    **{f"data.{key}": doc for key, doc in DATA_DOCS.items()},
}


def model_config_from(config: ml_collections.ConfigDict) -> LlamaConfig:
    """The `model` section as a LlamaConfig; an invalid value is a config error naming the key. A
    stage that starts from a checkpoint has filled its architecture first (stages/initial.py)."""
    unset = [key for key in ARCHITECTURE_FIELDS if config.model[key] is None and key != "ffn_dim_multiplier"]
    if unset:
        raise ConfigError(f"model.{unset[0]} is not set yet: it comes from init_checkpoint "
                          f"({config.init_checkpoint or 'empty'}), read by stages.initial.start_from_checkpoint "
                          "(or model_for_compiling, without a checkpoint)")
    values = {key: value for key, value in config.model.to_dict().items() if key != "size"}
    if "lora" in config:
        lora = config.lora
        problems = lora_problems(lora.rank, lora.alpha, lora.targets, lora.base_dtype, lora.dropout)
        if problems:
            raise ConfigError("; ".join(problems))
        values.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=tuple(lora.targets),
                      lora_base_dtype=lora.base_dtype, lora_dropout=lora.dropout)
    try:
        return LlamaConfig.from_dict(values)
    except ValueError as error:
        raise ConfigError(f"{error} (set it with --config.model.KEY=VALUE)") from None
