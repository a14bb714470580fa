"""Pretraining: next-token prediction on packed documents, through the one training loop.

    python -m llama2_jax train --config=configs/pretrain.py:tiny --workdir=runs/tiny
    python -m llama2_jax train --config=configs/pretrain.py:7b --workdir=/shared/runs/7b \
        --config.train.steps=1000 --config.optimizer.peak_lr=2e-4

Rerunning with the same workdir resumes from its newest checkpoint. From a notebook:

    from llama2_jax.config_cli import load_config_file
    from llama2_jax.train import pretrain
    config = load_config_file("configs/pretrain.py:tiny")
    config.train.steps = 200
    result = pretrain.run(config, "runs/tiny")   # result.model() is the trained model
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from llama2_jax import generate
from llama2_jax.config_cli import parse_config_flags
from llama2_jax.data.pipeline import load_tokenizer, make_batches
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.train.loop import Task, TrainResult, train
from llama2_jax.train.losses import make_next_token_loss

def pretrain_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Task:
    """The language-modelling task over `config.data`, read with `tokenizer`."""
    model_config = LlamaConfig.from_dict(config.model.to_dict())
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model only "
            f"{model_config.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
            "or use another data.tokenizer_path"
        )
    train_config, data = config.train, config.data

    def batches(mesh, split: str, num_epochs: int | None):
        return make_batches(
            data, tokenizer, seq_len=train_config.seq_len,
            global_batch_size=train_config.global_batch_size, mesh=mesh, seed=train_config.seed,
            split=split, num_epochs=num_epochs, rules=tuple(tuple(rule) for rule in config.rules),
        )

    return Task(
        model_config=model_config,
        loss_fn=make_next_token_loss(z_loss_weight=train_config.z_loss_weight),
        train_batches=lambda mesh: batches(mesh, data.train_split, None),
        eval_batches=(lambda mesh: batches(mesh, data.eval_split, 1)) if train_config.eval_every else None,
        tokenizer_path=str(tokenizer.path),
    )


def unigram_entropy(config: ml_collections.ConfigDict, tokenizer: Tokenizer, tokens: int = 200_000) -> float:
    """Entropy (nats per token) of the target-token frequencies in the first `tokens` training
    tokens: the loss of the best model that ignores context, the line a language model must go
    far below."""
    rows = 64
    batches = make_batches(
        config.data, tokenizer, seq_len=config.train.seq_len, global_batch_size=rows, mesh=None,
        seed=config.train.seed, split=config.data.train_split, process_index=0, process_count=1,
    )
    counts = np.zeros(tokenizer.vocab_size)
    for _, batch in zip(range(-(-tokens // (rows * config.train.seq_len))), batches):
        np.add.at(counts, batch["targets"].ravel(), batch["loss_weights"].ravel())
    probabilities = counts[counts > 0] / counts.sum()
    return float(-np.sum(probabilities * np.log(probabilities)))


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Pretrain as `config` says in `workdir` (resuming if it holds checkpoints); print a sample."""
    tokenizer = load_tokenizer(config.data)
    task = pretrain_task(config, tokenizer)
    if jax.process_index() == 0:
        print(f"unigram entropy of the training tokens: {unigram_entropy(config, tokenizer):.3f} nats")
    result = train(config, workdir, task)
    if config.train.sample_prompt and config.train.sample_length > 0 and not result.interrupted:
        print_sample(result, tokenizer, config.train.sample_prompt, config.train.sample_length)
    return result


def print_sample(result: TrainResult, tokenizer: Tokenizer, prompt: str, length: int) -> None:
    """A short continuation of `prompt` from the trained model (temperature 0.8, top-p 0.9)."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    generation = generate.generate(
        result.model(),
        [prompt_ids],
        max_new_tokens=length,
        eos_id=tokenizer.eos_id,
        sampling=generate.SamplingParams(temperature=0.8, top_p=0.9),
        mesh=result.mesh,
        rules=result.rules,
    )
    # Decoded together with the prompt: SentencePiece drops a continuation's leading space.
    text = tokenizer.decode(prompt_ids + generation.token_lists()[0])
    if jax.process_index() == 0:
        print(f"\n--- sample ---\n{text}\n--------------")


def main(argv: Sequence[str]) -> int:
    try:
        config, rest = parse_config_flags(argv)
    except ValueError as error:  # ConfigError included: a bad flag, file or key
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax train",
        description="Pretrain a Llama model. Config: --config=configs/pretrain.py:SIZE plus "
        "--config.SECTION.KEY=VALUE overrides.",
    )
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and TensorBoard go here")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.makedirs(args.workdir, exist_ok=True)
    run(config, args.workdir)
    return 0
