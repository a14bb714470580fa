"""Supervised fine-tuning: dialogs in the Llama 2 chat format, the loss on the answers only.

    python -m llama2_jax sft --config=configs/sft.py:tiny --workdir=runs/sft
    python -m llama2_jax sft --config=configs/sft.py:7b --config.init_checkpoint=llama-2-7b/ \
        --config.data.dataset=my_dialogs --workdir=/data/runs/sft-7b

The run starts from `init_checkpoint` (Meta, Hugging Face, ours, or a pretraining workdir), loaded
straight onto the run's mesh by its rules; rerunning resumes from the workdir's own checkpoint,
never the initial weights again. Each dialog becomes one packed example (data/dialogs.py): loss
weight 1 on every trained answer and its EOS, 0 on the system prompt and the user turns; packed
examples never attend to each other. With `train.steps` 0 the run lasts `train.epochs` passes over
the dialogs. At the end the model answers a few held-out prompts, printed and saved to
`WORKDIR/answers.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_collections

from llama2_jax import generate
from llama2_jax.checkpoint.load import checkpoint_config, load_pretrained, load_tokenizer
from llama2_jax.config_cli import ConfigError
from llama2_jax.data.dialogs import DialogPieces, example_messages, scan
from llama2_jax.data.pipeline import make_batches, open_split, packed_rows
from llama2_jax.data.text import next_token_spec
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.eval.multiple_choice import task_evaluator
from llama2_jax.model.config import LlamaConfig
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.losses import make_next_token_loss
from llama2_jax.train.task import Task

STAGE = "sft"
CONFIG_DOCS = {
    "init_checkpoint": "the model to fine-tune: Meta, Hugging Face, ours, or a pretraining workdir",
    "sft.eval_prompts": "held-out dialogs the model answers when training ends (0: none)",
    "sft.answer_tokens": "longest of those answers, in tokens",
}
# Fields that fix the weights' shapes: a checkpoint must agree with the config on all of them.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")

log = logging.getLogger(__name__)


def fine_tuning_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The initial checkpoint's own tokenizer, else data.tokenizer_path (else the bundled one)."""
    try:
        return load_tokenizer(config.init_checkpoint)
    except FileNotFoundError:
        if not os.path.isdir(config.init_checkpoint):
            raise
        return Tokenizer(config.data.tokenizer_path or None)


def check_initial_checkpoint(config: ml_collections.ConfigDict, tokenizer: Tokenizer, kind: str = "llama") -> None:
    """One clear error if the initial checkpoint is missing, of another kind or shape than the
    config, or if the tokenizer does not fit the model."""
    if not config.init_checkpoint:
        raise ConfigError("set --config.init_checkpoint to the model to fine-tune (Meta, Hugging Face, "
                          "ours, or a pretraining workdir)")
    saved, saved_kind = checkpoint_config(config.init_checkpoint)
    if saved_kind != kind:
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


def load_initial_model(config: ml_collections.ConfigDict, model_config: LlamaConfig, mesh, rules):
    """The initial checkpoint on the run's mesh, laid out by its rules, with the config's storage
    and compute dtypes, kernel, remat and context."""
    return load_pretrained(
        config.init_checkpoint, dtype=model_config.compute_dtype, param_dtype=model_config.param_dtype, mesh=mesh,
        rules=rules, attention=model_config.attention, remat=model_config.remat,
        max_seq_len=model_config.max_seq_len)


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Task:
    """Answer-only next-token loss over the dialogs of `config.data`, from `config.init_checkpoint`."""
    model_config = model_config_from(config)
    train_config, data = config.train, config.data
    spec = next_token_spec(train_config.seq_len)

    def batches(mesh, rules, split: str, num_epochs: int | None):
        dialog_tokenizer = tokenizer or fine_tuning_tokenizer(config)
        return make_batches(
            data, open_split(data, split, dialog_tokenizer, kind="chat"), spec,
            DialogPieces(dialog_tokenizer, train_config.seq_len), global_batch_size=train_config.global_batch_size,
            mesh=mesh, rules=rules, seed=train_config.seed, num_epochs=num_epochs)

    return Task(
        model_config=model_config,
        loss_fn=make_next_token_loss(z_loss_weight=train_config.z_loss_weight),
        batch_spec=spec,
        train_batches=lambda mesh, rules: batches(mesh, rules, data.train_split, None),
        eval_batches=(lambda mesh, rules: batches(mesh, rules, data.eval_split, 1)) if train_config.eval_every else None,
        initial_model=lambda mesh, rules: load_initial_model(config, model_config, mesh, rules),
        model_evals=task_evaluator(train_config.eval_tasks, tokenizer) if tokenizer and train_config.eval_tasks else None,
        tokenizer_path=str(tokenizer.path) if tokenizer else None,
    )


def steps_for_epochs(config: ml_collections.ConfigDict, piece_lengths) -> int:
    """Optimizer steps for `train.epochs` passes: packed rows per epoch over the batch size."""
    data = config.data
    rows = packed_rows(piece_lengths, config.train.seq_len,
                       data.packing_bins or max(config.train.global_batch_size // jax.process_count(), 16),
                       config.train.seed)
    return max(1, math.ceil(config.train.epochs * rows / config.train.global_batch_size))


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Fine-tune as `config` says in `workdir` (resuming if it holds checkpoints); answer held-out prompts."""
    tokenizer = fine_tuning_tokenizer(config)
    check_initial_checkpoint(config, tokenizer)
    encoder = DialogPieces(tokenizer, config.train.seq_len)
    counts = scan(open_split(config.data, config.data.train_split, tokenizer, kind="chat"), encoder)
    log.info("training dialogs: %s", counts.summary())
    if jax.process_index() == 0:
        print(f"training dialogs: {counts.summary()}")
    if not config.train.steps:
        if config.train.epochs <= 0:
            raise ConfigError("set --config.train.steps or --config.train.epochs")
        config.train.steps = steps_for_epochs(config, counts.piece_lengths)
        log.info("%g epochs of %s dialogs: %d steps", config.train.epochs, config.data.dataset, config.train.steps)
    result = train(config, workdir, make_task(config, tokenizer))
    if config.sft.eval_prompts > 0 and not result.interrupted:
        answer_held_out(result, config, tokenizer, os.path.join(workdir, "answers.jsonl"))
    return result


def answer_held_out(result: TrainResult, config: ml_collections.ConfigDict, tokenizer: Tokenizer, path: str) -> None:
    """The model's answers to the first held-out dialogs, printed and written to `path` as JSON lines
    {"messages": the prompt, "reference": the held-out answer, "answer": the model's} (greedy)."""
    source = open_split(config.data, config.data.eval_split, tokenizer, kind="chat")
    dialogs = [example_messages(source[index]) for index in range(min(config.sft.eval_prompts, len(source)))]
    prompts = [[{"role": m["role"], "content": m["content"]} for m in dialog[:-1]] for dialog in dialogs]
    answers = generate.answer_dialogs(result.model(), tokenizer, prompts, max_new_tokens=config.sft.answer_tokens,
                                      mesh=result.mesh, rules=result.rules)
    if jax.process_index() != 0:
        return
    with open(path, "w", encoding="utf-8") as out:
        for prompt, dialog, answer in zip(prompts, dialogs, answers):
            out.write(json.dumps({"messages": prompt, "reference": dialog[-1]["content"], "answer": answer},
                                 ensure_ascii=False) + "\n")
            print(f"\n[user] {prompt[-1]['content']}\n[reference] {dialog[-1]['content']}\n[model] {answer}")
    print(f"\nwrote {len(answers)} held-out answers to {path}")
