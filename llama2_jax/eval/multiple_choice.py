"""Multiple-choice tasks scored by log-likelihood, the protocol of HellaSwag / MMLU-style harnesses.

A task is JSON lines `{"context": str, "choices": [str, ...], "answer": index}`. Each choice is scored
by the log-likelihood of its tokens after the context: BOS + context + " " + choice is tokenized whole
and the choice's tokens are those past the context's own. The prediction is the choice with the
highest sum (`accuracy`), or the highest sum per character of the choice (`accuracy_norm`, which
does not favour short choices). With `shots` k, k other examples of the task (drawn with a fixed
seed), each context followed by its right answer, precede the context, a blank line apart. A
context too long for the model loses its oldest tokens.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence

import numpy as np

from llama2_jax.data.records import DataError, jsonl_records
from llama2_jax.eval.likelihood import log_likelihoods


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    answer: int


def read_task(path: str, named_by: str = "--task") -> list[Example]:
    """The examples of a task file; a bad line is an error naming file and line, and a missing or
    empty file one naming `named_by`, the flag or key that gave the path."""
    examples = []
    for file, line, record in jsonl_records([path], named_by=named_by):
        context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
        where = f"{file}:{line}"
        if not isinstance(context, str):
            raise DataError(f"{where}: expected a \"context\" string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                         for c in choices):
            raise DataError(f"{where}: expected \"choices\", a list of at least two non-empty strings")
        if answer is None:
            raise DataError(f"{where}: no \"answer\" (the index of the right choice)")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
        examples.append(Example(context, tuple(choices), answer))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def joined(context: str, choice: str) -> str:
    return context + choice if not context or context[-1].isspace() or choice[:1].isspace() else f"{context} {choice}"


def choice_sequence(tokenizer, context: str, choice: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS + context + choice as tokens, and a weight per prediction: 1 on the choice's tokens."""
    whole = tokenizer.encode(joined(context, choice), bos=True, eos=False)
    context_tokens = tokenizer.encode(context, bos=True, eos=False)
    start = 0
    while start < min(len(whole), len(context_tokens)) and whole[start] == context_tokens[start]:
        start += 1
    if start >= len(whole):
        raise DataError(f"the choice {choice!r} adds no tokens to its context")
    keep = max_tokens + 1
    if len(whole) > keep:  # drop the context's oldest tokens, keeping BOS
        if len(whole) - start + 1 > keep:
            raise DataError(f"the choice {choice!r} alone is longer than the model's context")
        cut = len(whole) - keep + 1
        whole, start = whole[:1] + whole[1 + cut:], start - cut
    weights = np.zeros(len(whole) - 1, np.float32)
    weights[start - 1:] = 1.0
    return np.asarray(whole, np.int32), weights


def with_shots(examples: Sequence[Example], shots: int, seed: int) -> list[str]:
    """Each example's context preceded by `shots` other examples answered."""
    if shots and shots >= len(examples):
        raise DataError(f"{shots} shots need more than {len(examples)} examples in the task")
    rng = random.Random(seed)
    contexts = []
    for index, example in enumerate(examples):
        others = rng.sample([i for i in range(len(examples)) if i != index], shots) if shots else []
        solved = [joined(examples[i].context, examples[i].choices[examples[i].answer]) for i in others]
        contexts.append("\n\n".join([*solved, example.context]))
    return contexts


def evaluate(model, tokenizer, examples: Sequence[Example], *, shots: int = 0, seed: int = 0, batch_size: int = 32,
             mesh=None, rules=None) -> dict:
    """{"accuracy", "accuracy_norm", "chance", "examples", "shots"} of the model on `examples`."""
    sequences, weights, owners = [], [], []
    for index, context in enumerate(with_shots(examples, shots, seed)):
        for choice in examples[index].choices:
            tokens, weight = choice_sequence(tokenizer, context, choice, model.config.max_seq_len)
            sequences.append(tokens)
            weights.append(weight)
            owners.append(index)
    totals, _ = log_likelihoods(model, sequences, weights, batch_size=batch_size, mesh=mesh, rules=rules)
    right = right_norm = 0
    position = 0
    for example in examples:
        scores = totals[position:position + len(example.choices)]
        position += len(example.choices)
        lengths = np.array([len(choice) for choice in example.choices])
        right += int(np.argmax(scores)) == example.answer
        right_norm += int(np.argmax(scores / lengths)) == example.answer
    return {"accuracy": right / len(examples), "accuracy_norm": right_norm / len(examples),
            "chance": float(np.mean([1 / len(example.choices) for example in examples])),
            "examples": len(examples), "shots": shots}


def task_evaluator(paths: Sequence[str], tokenizer, *, shots: int = 0):
    """`Task.model_evals` for these task files: each one's accuracy and accuracy_norm, named by the
    file's stem (`next_line_choice_accuracy`), at every evaluation of a training run."""
    tasks = {os.path.splitext(os.path.basename(path))[0]: read_task(path, "train.eval_tasks") for path in paths}

    def evaluate_model(model, mesh, rules) -> dict[str, float]:
        values = {}
        for name, examples in tasks.items():
            result = evaluate(model, tokenizer, examples, shots=shots, mesh=mesh, rules=rules)
            values[f"{name}_accuracy"] = result["accuracy"]
            values[f"{name}_accuracy_norm"] = result["accuracy_norm"]
        return values

    return evaluate_model
