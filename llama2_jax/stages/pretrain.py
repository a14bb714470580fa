"""Pretraining: next-token prediction on packed documents, through the one training loop.

    python -m llama2_jax train --config=configs/pretrain.py:tiny --workdir=runs/tiny
    python -m llama2_jax train --config=configs/pretrain.py:7b --workdir=/data/runs/7b \
        --config.data.dataset=mycorpus --config.train.steps=1000 --config.optimizer.peak_lr=2e-4

Rerunning with the same workdir resumes from its newest checkpoint. From a notebook:

    from llama2_jax.config_cli import load_config_file
    from llama2_jax.stages import pretrain
    config = load_config_file("configs/pretrain.py:tiny")
    config.train.steps = 200
    result = pretrain.run(config, "runs/tiny")   # result.model() is the trained model
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from llama2_jax import generate
from llama2_jax.data import tokenized
from llama2_jax.data.pipeline import load_tokenizer, open_split
from llama2_jax.data.text import DocumentChunks, unigram_entropy
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.stages.next_token import next_token_task
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.task import Task

STAGE = "pretrain"
CONFIG_DOCS = {
    "train.sample_prompt": "printed with a continuation from the model when training ends (empty: none)",
    "train.sample_length": "tokens in that continuation",
}


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Task:
    """The language-modelling task over `config.data`. The tokenizer is loaded when batches are
    first made, unless given."""
    return next_token_task(config, tokenizer, kind="text", pieces=DocumentChunks,
                           default_tokenizer=lambda: load_tokenizer(config.data))


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Pretrain as `config` says in `workdir` (resuming if it holds checkpoints); print a sample."""
    tokenizer = load_tokenizer(config.data)
    task = make_task(config, tokenizer)
    if tokenizer.vocab_size > task.model_config.vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model only "
            f"{task.model_config.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
            "or use another data.tokenizer_path")
    if jax.process_index() == 0:
        entropy = unigram_entropy(*_training_examples(config, tokenizer), tokenizer.vocab_size)
        print(f"unigram entropy of the training tokens: {entropy:.3f} nats")
    result = train(config, workdir, task)
    if config.train.sample_prompt and config.train.sample_length > 0 and not result.interrupted:
        text = sample(result, tokenizer, config.train.sample_prompt, config.train.sample_length)
        if jax.process_index() == 0:
            print(f"\n--- sample ---\n{text}\n--------------")
    return result


def _training_examples(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> tuple[Any, Callable]:
    """The training split's examples and what cuts one into pieces (a packed row is a piece already)."""
    data, seq_len = config.data, config.train.seq_len
    if tokenized.is_configured(data):
        return tokenized.open_rows(data, data.train_split, tokenizer, seq_len), lambda row: [row]
    return open_split(data, data.train_split, kind="text"), DocumentChunks(tokenizer, seq_len)


def sample(result: TrainResult, tokenizer: Tokenizer, prompt: str, length: int, seed: int = 0) -> str:
    """`prompt` and a continuation of it from the trained model (temperature 0.8, top-p 0.9)."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    generation = generate.generate(
        result.model(), [prompt_ids], max_new_tokens=length, eos_id=tokenizer.eos_id,
        sampling=generate.SamplingParams(temperature=0.8, top_p=0.9), seed=seed, mesh=result.mesh,
        rules=result.rules)
    # Decoded together with the prompt: SentencePiece drops a continuation's leading space.
    return tokenizer.decode(prompt_ids + generation.token_lists()[0])
