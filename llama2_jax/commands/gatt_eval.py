"""`python -m llama2_jax gatt-eval`: does a model keep following an instruction given once?

    python -m llama2_jax gatt-eval --checkpoint runs/sft --checkpoint runs/gatt

Each held-out multi-turn dialog of `--dialogs` (default: the bundled demo's) gets an instruction in
its first user turn only (the same draws for every model); the model answers turn after turn, its
own answers kept in the dialog, until the dialog ends or no longer fits the context; at each turn a
program checks whether the answer still follows the instruction. Prints, per turn, the share of
answers that do (the paper's attribute recall, Table 30), one column per checkpoint; with `--out`,
also writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import jax

from llama2_jax.cli import ArgumentParser, print_phase, reports_errors
from llama2_jax.commands.gatt import add_conversation_flags, answer_with, conversations, read_dialogs
from llama2_jax.commands.model_flags import load_for_sampling
from llama2_jax.data.gatt import converse, recall_by_turn


def recall_table(checkpoint: str, args: argparse.Namespace) -> dict[int, tuple[int, int]]:
    model, tokenizer = load_for_sampling(argparse.Namespace(**{**vars(args), "checkpoint": checkpoint}))
    dialogs = conversations(read_dialogs(args.dialogs), args.seed, every_turn=False)
    converse(dialogs, answer_with(model, tokenizer, args), tokenizer, model.config.max_seq_len, args.answer_tokens)
    return recall_by_turn(dialogs)


def format_table(checkpoints: Sequence[str], tables: Sequence[dict[int, tuple[int, int]]]) -> str:
    turns = sorted(set().union(*tables))
    lines = ["| turn | " + " | ".join(checkpoints) + " |", "|---|" + "---|" * len(checkpoints)]
    for turn in turns:
        cells = [f"{100 * table[turn][0] / table[turn][1]:.0f} % ({table[turn][1]})" if turn in table else "–"
                 for table in tables]
        lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax gatt-eval", description=__doc__)
    add_conversation_flags(parser, "gatt_dialogs_validation.jsonl", temperature=0.0, many=True)
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoint
    tables = []
    for number, checkpoint in enumerate(checkpoints, start=1):
        print_phase(f"model {number} of {len(checkpoints)}: {checkpoint}")
        tables.append(recall_table(checkpoint, args))
    if jax.process_index() == 0:
        print("attribute recall: answers that follow the first turn's instruction (answers given)")
        print(format_table(checkpoints, tables))
        if args.out:
            with open(args.out, "w") as out:
                json.dump({checkpoint: {turn: {"followed": followed, "answers": given}
                                        for turn, (followed, given) in table.items()}
                           for checkpoint, table in zip(checkpoints, tables)}, out, indent=1)
    return 0
