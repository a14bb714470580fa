"""What every fine-tuning stage (SFT, the reward models) does with the checkpoint it starts from.

    tokenizer = initial_tokenizer(config)            # the checkpoint's own, else data.tokenizer_path
    check_initial_checkpoint(config, tokenizer)      # one clear error before any weights are read
    model = load_initial_model(config, mesh, rules)  # on the run's mesh, laid out by its rules
    set_steps_from_epochs(config, rows_per_epoch)    # train.steps from train.epochs when 0

A later stage (rejection sampling, PPO) starts the same way, so these live here and not in a stage.
"""

from __future__ import annotations

import logging
import math

import ml_collections

from llama2_jax import storage
from llama2_jax.checkpoint.load import checkpoint_config, load_pretrained, load_tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.train.config import model_config_from

# Fields that fix the weights' shapes: the initial checkpoint must agree with the config on all of them.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")

log = logging.getLogger(__name__)


def initial_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The initial checkpoint's tokenizer; data.tokenizer_path (else the bundled one) only when the
    checkpoint has none. A data.tokenizer_path that differs from the checkpoint's is an error: the
    model only knows the pieces it was trained with."""
    if not config.init_checkpoint:
        raise ConfigError("set --config.init_checkpoint to the model to start from (Meta, Hugging Face, ours, "
                          "or a workdir of an earlier stage)")
    try:
        own = load_tokenizer(config.init_checkpoint)
    except FileNotFoundError:
        if not storage.as_path(config.init_checkpoint).is_dir():
            raise
        return Tokenizer(config.data.tokenizer_path or None)
    given = config.data.tokenizer_path
    if given and storage.as_path(given).read_bytes() != own.path.read_bytes():
        raise ValueError(f"data.tokenizer_path {given} is not the tokenizer of {config.init_checkpoint} "
                         f"({own.path}), which the model was trained with; leave data.tokenizer_path empty")
    return own


def check_initial_checkpoint(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                             kind: str | None = None) -> None:
    """One clear error if the initial checkpoint is of another kind (when `kind` is given) or shape
    than the config, or if the tokenizer does not fit the model."""
    saved, saved_kind = checkpoint_config(config.init_checkpoint)
    if kind is not None and saved_kind != kind:
        raise ValueError(f"{config.init_checkpoint} holds a {saved_kind} model, not a {kind} one")
    wanted = model_config_from(config)
    differ = [f"{field} {getattr(saved, field)} (config: {getattr(wanted, field)})" for field in SHAPE_FIELDS
              if getattr(saved, field) != getattr(wanted, field)]
    if differ:
        raise ValueError(f"{config.init_checkpoint} does not have the config's shape: " + ", ".join(differ)
                         + "; pick the config size of that checkpoint or set --config.model.KEY to match")
    if tokenizer.vocab_size > wanted.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model only "
                         f"{wanted.vocab_size}; use the tokenizer the model was trained with "
                         "(--config.data.tokenizer_path)")


def load_initial_model(config: ml_collections.ConfigDict, mesh, rules, kind: str | None = None):
    """The initial checkpoint on the run's mesh, laid out by its rules, with the config's storage and
    compute dtypes, kernel, remat and context; `kind="reward"` puts a language model's backbone
    under a new score head (drawn from train.seed)."""
    model_config = model_config_from(config)
    return load_pretrained(
        config.init_checkpoint, dtype=model_config.compute_dtype, param_dtype=model_config.param_dtype,
        mesh=mesh, rules=rules, kind=kind, seed=config.train.seed, attention=model_config.attention,
        remat=model_config.remat, max_seq_len=model_config.max_seq_len)


def set_steps_from_epochs(config: ml_collections.ConfigDict, rows_per_epoch: float) -> None:
    """With train.steps 0, train.steps becomes train.epochs passes of `rows_per_epoch` batch rows."""
    if config.train.steps:
        return
    if config.train.epochs <= 0:
        raise ConfigError("set --config.train.steps or --config.train.epochs")
    config.train.steps = max(1, math.ceil(config.train.epochs * rows_per_epoch / config.train.global_batch_size))
    log.info("%g epochs of %s: %d steps", config.train.epochs, config.data.dataset, config.train.steps)
