"""The next-token tasks the stages share: pretraining's over packed documents, and SFT's over
dialogs with the loss on the answers only (SFT, and each round of rejection sampling on the answers
it selected).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from llama2_jax.data import tokenized
from llama2_jax.data.dialogs import DialogPieces
from llama2_jax.data.pipeline import make_batches, open_split, packed_rows
from llama2_jax.data.row_batches import make_row_batches
from llama2_jax.data.text import next_token_spec
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.eval.multiple_choice import task_evaluator
from llama2_jax.stages.initial import initial_tokenizer, load_initial_model
from llama2_jax.train.config import model_config_from
from llama2_jax.train.losses import make_next_token_loss
from llama2_jax.train.task import Task


def next_token_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None, *, kind: str,
                    pieces: Callable[[Tokenizer, int], Any], default_tokenizer: Callable[[], Tokenizer],
                    initial_model: Callable | None = None, train_examples: Any = None) -> Task:
    """Next-token loss over the examples of `config.data` (`kind` "text" or "chat"), each cut into
    pieces of at most seq_len by `pieces(tokenizer, seq_len)` and packed: pretraining, and SFT with
    pieces that weigh only the answers. `train_examples` (random access), when given, are trained on
    instead of the dataset's training split, without held-out evaluation (rejection sampling trains
    on the answers it selected)."""
    train_config, data = config.train, config.data
    spec = next_token_spec(train_config.seq_len)

    def examples(split: str):
        return open_split(data, split, kind=kind) if train_examples is None else train_examples

    def batches(mesh, rules, split: str, num_epochs: int | None):
        split_tokenizer = tokenizer or default_tokenizer()
        options = {"global_batch_size": train_config.global_batch_size, "mesh": mesh, "rules": rules,
                   "seed": train_config.seed, "num_epochs": num_epochs}
        if kind == "text" and tokenized.is_configured(data):  # packed ahead of time: read by row index
            rows = tokenized.open_rows(data, split, split_tokenizer, train_config.seq_len)
            return make_row_batches(data, rows, spec, **options)
        return make_batches(data, examples(split), spec, pieces(split_tokenizer, train_config.seq_len), **options)

    evaluates_tasks = tokenizer is not None and train_config.eval_tasks
    return Task(
        model_config=model_config_from(config),
        loss_fn=make_next_token_loss(z_loss_weight=train_config.z_loss_weight),
        batch_spec=spec,
        train_batches=lambda mesh, rules: batches(mesh, rules, data.train_split, None),
        eval_batches=((lambda mesh, rules: batches(mesh, rules, data.eval_split, 1))
                      if train_config.eval_every and train_examples is None else None),
        initial_model=initial_model,
        model_evals=task_evaluator(train_config.eval_tasks, tokenizer) if evaluates_tasks else None,
        tokenizer_path=str(tokenizer.path) if tokenizer else None,
    )


def dialog_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
                dialogs: Sequence[Mapping[str, Any]] | None = None) -> Task:
    """Answer-only next-token loss over the dialogs of `config.data`, from `config.init_checkpoint`;
    or over `dialogs` (`{"messages": [...]}` each, random access) when given, without evaluation."""
    return next_token_task(config, tokenizer, kind="chat", pieces=DialogPieces,
                           default_tokenizer=lambda: initial_tokenizer(config),
                           initial_model=lambda mesh, rules: load_initial_model(config, mesh, rules),
                           train_examples=dialogs)


def rows_per_epoch(config: ml_collections.ConfigDict, piece_lengths) -> int:
    """Packed rows of `seq_len` the dialogs of one epoch make, packed as the pipeline packs them."""
    return packed_rows(piece_lengths, config.train.seq_len, config.data,
                       config.train.global_batch_size // jax.process_count(), config.train.seed)


