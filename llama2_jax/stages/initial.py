"""What every stage after pretraining does with the checkpoint it starts from.

    tokenizer = start_from_checkpoint(config, kind)  # the model section filled from the checkpoint, its
                                                     # kind checked, its tokenizer: errors before any weights
    model = load_initial_model(config, mesh, rules)  # on the run's mesh, laid out by its rules
    set_steps_from_epochs(config, rows_per_epoch)    # train.steps from train.epochs when 0

The checkpoint says what the model is: every architecture key (shapes, RoPE base, norm epsilon,
vocabulary, positions) comes from it, so a fine-tuned model is saved with the settings it was trained
with whatever size preset the config was made for. `aot` and `bench` read it the same way
(`model_for_compiling`), falling back to the size's shape only when there is no checkpoint to read.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import ml_collections

from llama2_jax import storage
from llama2_jax.checkpoint.load import (KIND_NAMES, TOKENIZER_FILE, checkpoint_config, load_pretrained, load_tokenizer,
                                        with_new_parameters)
from llama2_jax.errors import ConfigError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import ARCHITECTURE_FIELDS, LlamaConfig
from llama2_jax.train.config import model_config_from

# Fields that fix the weights' shapes: models trained together (a policy and its value model) share them.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")

log = logging.getLogger(__name__)


def start_from_checkpoint(config: ml_collections.ConfigDict, kind: str | None = "llama") -> Tokenizer:
    """The model section filled from init_checkpoint (`fill_model_from_checkpoint`), the checkpoint
    checked to hold a model of `kind` (None: any), and the tokenizer it was trained with."""
    if not config.init_checkpoint:
        raise ConfigError("set --config.init_checkpoint to the model to start from (Meta, Hugging Face, ours, "
                          "or a workdir of an earlier stage)")
    saved, saved_kind = checkpoint_config(config.init_checkpoint)
    if kind is not None and saved_kind != kind:
        raise ValueError(f"{config.init_checkpoint} holds a {KIND_NAMES.get(saved_kind, saved_kind)}, not a "
                         f"{KIND_NAMES[kind]}; set --config.init_checkpoint to a {KIND_NAMES[kind]} "
                         f"({_WHERE_FROM[kind]})")
    model = fill_model_from_checkpoint(config, saved)
    tokenizer = initial_tokenizer(config)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model "
                         f"{config.init_checkpoint} only {model.vocab_size}; use the tokenizer the model was "
                         "trained with (--config.data.tokenizer_path)")
    return tokenizer


_WHERE_FROM = {"llama": "a pretraining or SFT workdir, or Meta's or Hugging Face's weights",
               "reward": "a workdir of `python -m llama2_jax reward`"}


def fill_model_from_checkpoint(config: ml_collections.ConfigDict, saved: LlamaConfig) -> LlamaConfig:
    """Every architecture key of the model section set to the checkpoint's `saved` value. A key the
    config gives must agree; max_seq_len may be shorter (training at fewer positions), and the
    checkpoint's is kept, as is a train.seq_len up to it."""
    model = config.model
    contradictions = [f"model.{field}={model[field]!r} but {config.init_checkpoint} has {getattr(saved, field)!r}"
                      for field in ARCHITECTURE_FIELDS
                      if model[field] is not None and model[field] != getattr(saved, field)
                      and not (field == "max_seq_len" and model[field] < saved.max_seq_len)]
    if contradictions:
        raise ConfigError("the checkpoint says what the model is: " + "; ".join(contradictions)
                          + "; leave those model keys unset")
    if config.train.seq_len > saved.max_seq_len:
        raise ConfigError(f"train.seq_len {config.train.seq_len} is longer than the {saved.max_seq_len} positions "
                          f"of {config.init_checkpoint}; set --config.train.seq_len to {saved.max_seq_len} or less")
    for field in ARCHITECTURE_FIELDS:
        model[field] = getattr(saved, field)
    return model_config_from(config)


def model_for_compiling(config: ml_collections.ConfigDict) -> LlamaConfig:
    """The model a config trains, for `aot` and `bench`, which compile without reading weights: the
    initial checkpoint's architecture when there is one to read, else the shape of the config's size
    (keys set in the config win), its context at least train.seq_len."""
    if "size" not in config.model:  # pretraining: the config is the model
        return model_config_from(config)
    if config.init_checkpoint and storage.as_path(config.init_checkpoint).exists():
        return fill_model_from_checkpoint(config, checkpoint_config(config.init_checkpoint)[0])
    log.info("no checkpoint at init_checkpoint %r: compiling the %s size's shape", config.init_checkpoint,
             config.model.size)
    preset = LlamaConfig.from_preset(config.model.size)
    for field in ARCHITECTURE_FIELDS:
        if config.model[field] is None:
            config.model[field] = getattr(preset, field)
    config.model.max_seq_len = max(config.model.max_seq_len, config.train.seq_len)
    return model_config_from(config)


def initial_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The initial checkpoint's tokenizer, or data.tokenizer_path where the checkpoint has none. A
    data.tokenizer_path that differs from the checkpoint's is an error: the model only knows the
    pieces it was trained with."""
    given = config.data.tokenizer_path
    try:
        own = load_tokenizer(config.init_checkpoint)
    except FileNotFoundError:
        directory = storage.as_path(config.init_checkpoint)
        if not directory.is_dir():
            raise
        if given:
            return Tokenizer(given)
        found = "has tokenizer.json but no" if (directory / "tokenizer.json").exists() else "has no"
        raise ValueError(f"{config.init_checkpoint} {found} {TOKENIZER_FILE} (the SentencePiece model Llama "
                         f"tokenizers ship as); copy the model's {TOKENIZER_FILE} there or set "
                         "--config.data.tokenizer_path to it") from None
    if given and storage.as_path(given).read_bytes() != own.path.read_bytes():
        raise ValueError(f"data.tokenizer_path {given} is not the tokenizer of {config.init_checkpoint} "
                         f"({own.path}), which the model was trained with; leave data.tokenizer_path empty")
    return own


def load_initial_model(config: ml_collections.ConfigDict, mesh, rules, kind: str | None = None):
    """The initial checkpoint on the run's mesh, laid out by its rules, with the config's storage and
    compute dtypes, kernel, remat and context; `kind="reward"` puts a language model's backbone
    under a new score head (drawn from train.seed). With `lora.rank` > 0 the checkpoint is the
    frozen base, read straight into `lora.base_dtype`, and gains new adapters (drawn from
    train.seed; B is zero, so the model starts as its base)."""
    model_config = model_config_from(config)
    model = load_pretrained(
        config.init_checkpoint, dtype=model_config.compute_dtype, param_dtype=model_config.base_dtype,
        mesh=mesh, rules=rules, kind=kind, seed=config.train.seed, attention=model_config.attention,
        remat=model_config.remat, max_seq_len=model_config.max_seq_len)
    if not model_config.lora_rank:
        return model
    shape = {field: getattr(model.config, field) for field in ARCHITECTURE_FIELDS}  # a value model's: its own
    adapted = dataclasses.replace(model_config, **shape)
    return with_new_parameters(model, adapted, type(model), mesh, rules, config.train.seed)


def set_steps_from_epochs(config: ml_collections.ConfigDict, rows_per_epoch: float) -> None:
    """With train.steps 0, train.steps becomes train.epochs passes of `rows_per_epoch` batch rows."""
    if config.train.steps:
        return
    if config.train.epochs <= 0:
        raise ConfigError("set --config.train.steps or --config.train.epochs")
    config.train.steps = max(1, math.ceil(config.train.epochs * rows_per_epoch / config.train.global_batch_size))
    log.info("%g epochs of %s: %d steps", config.train.epochs, config.data.dataset, config.train.steps)
