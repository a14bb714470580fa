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
import os

import jax
import ml_collections

from llama2_jax import storage
from llama2_jax.data.dialogs import DialogPieces, example_messages, scan
from llama2_jax.data.pipeline import open_split
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.rollout.sampler import answer_dialogs
from llama2_jax.stages.initial import start_from_checkpoint, set_steps_from_epochs
from llama2_jax.stages.next_token import dialog_task, rows_per_epoch
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.task import Task

STAGE = "sft"
CONFIG_DOCS = {
    "init_checkpoint": "the model to fine-tune: Meta, Hugging Face, ours, or a pretraining workdir",
    "sft.eval_prompts": "held-out dialogs the model answers when training ends (0: none)",
    "sft.answer_tokens": "longest of those answers, in tokens",
}

log = logging.getLogger(__name__)


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Task:
    """Answer-only next-token loss over the dialogs of `config.data`, from `config.init_checkpoint`."""
    return dialog_task(config, tokenizer)


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Fine-tune as `config` says in `workdir` (resuming if it holds checkpoints); answer held-out prompts."""
    tokenizer = start_from_checkpoint(config, kind="llama")
    encoder = DialogPieces(tokenizer, config.train.seq_len)
    counts = scan(open_split(config.data, config.data.train_split, kind="chat"), encoder)
    log.info("training dialogs: %s", counts.summary())
    if jax.process_index() == 0:
        print(f"training dialogs: {counts.summary()}")
    if not config.train.steps:
        set_steps_from_epochs(config, rows_per_epoch(config, counts.piece_lengths))
    result = train(config, workdir, make_task(config, tokenizer))
    if config.sft.eval_prompts > 0 and not result.interrupted:
        answer_held_out(result, config, tokenizer, storage.as_path(workdir) / "answers.jsonl")
    return result


def answer_held_out(result: TrainResult, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                    path: str | os.PathLike) -> None:
    """The model's answers to the first held-out dialogs, printed and written to `path` as JSON lines
    {"messages": the prompt, "reference": the held-out answer, "answer": the model's} (greedy)."""
    source = open_split(config.data, config.data.eval_split, kind="chat")
    dialogs = [example_messages(source[index]) for index in range(min(config.sft.eval_prompts, len(source)))]
    prompts = [[{"role": m["role"], "content": m["content"]} for m in dialog[:-1]] for dialog in dialogs]
    answers = answer_dialogs(result.model(), tokenizer, prompts, max_new_tokens=config.sft.answer_tokens,
                                      mesh=result.mesh, rules=result.rules)
    if jax.process_index() != 0:
        return
    lines = []
    for prompt, dialog, answer in zip(prompts, dialogs, answers):
        lines.append(json.dumps({"messages": prompt, "reference": dialog[-1]["content"], "answer": answer},
                                ensure_ascii=False) + "\n")
        print(f"\n[user] {prompt[-1]['content']}\n[reference] {dialog[-1]['content']}\n[model] {answer}")
    storage.as_path(path).write_text("".join(lines), encoding="utf-8")
    print(f"\nwrote {len(answers)} held-out answers to {path}")
