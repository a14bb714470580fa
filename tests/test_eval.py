"""Evaluation: perplexity against the model's own logits, a multiple-choice task that a trained model
solves and an untrained one does not, and one clear error per bad task line."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.eval import likelihood, multiple_choice, perplexity
from llama2_jax.metrics import read_metrics
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

TOKENIZER = Tokenizer()
TASK = "llama2_jax/assets/demo/next_line_choice.jsonl"
DOCUMENTS = ["Now is the winter of our discontent", "To be, or not to be: that is the question. " * 12, "O"]


@pytest.fixture(scope="module")
def untrained():
    return Llama(LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=64), rngs=nnx.Rngs(0))


def test_perplexity_is_exp_of_the_mean_nll_of_the_models_logits(untrained):
    result = perplexity.perplexity(untrained, TOKENIZER, DOCUMENTS)
    total, count = 0.0, 0
    for document in DOCUMENTS:
        tokens = np.asarray(TOKENIZER.encode(document, bos=True, eos=False))
        for start in range(0, len(tokens) - 1, 64):  # consecutive windows of the 64-token context
            window = tokens[start:start + 65]
            logits = np.asarray(untrained(window[None, :-1])[0], np.float64)
            top = logits.max(axis=-1, keepdims=True)
            log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
            total -= float(np.take_along_axis(log_probs, window[1:, None], axis=-1).sum())
            count += len(window) - 1
    assert result["tokens"] == count == sum(len(TOKENIZER.encode(d, bos=True)) - 1 for d in DOCUMENTS)
    assert result["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_document_without_tokens_is_skipped_and_counted(untrained):
    assert perplexity.perplexity(untrained, TOKENIZER, ["", "Hark!"])["skipped_empty"] == 1
    with pytest.raises(DataError, match="no document holds any token"):
        perplexity.perplexity(untrained, TOKENIZER, ["", ""])


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}", "--config.train.steps=150",
                     "--config.train.seq_len=128", "--config.train.global_batch_size=16", "--config.train.eval_steps=1",
                     "--config.train.eval_every=150", f"--config.train.eval_tasks=('{TASK}',)",
                     "--config.train.sample_length=0", "--config.train.log_every=50"]) == 0
    return workdir


@pytest.fixture(scope="module")
def trained(trained_workdir):
    return load_pretrained(trained_workdir)


def test_tasks_are_scored_at_every_evaluation_of_a_training_run(trained_workdir):
    evaluations = [record for record in read_metrics(trained_workdir) if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [0, 150]
    before, after = (record["eval_next_line_choice_accuracy"] for record in evaluations)
    assert before < 0.4 < 0.75 < after


def test_real_lines_beat_shuffled_ones_for_a_trained_model_only(trained, untrained):
    examples = multiple_choice.read_task(TASK)[:120]
    learnt = multiple_choice.evaluate(trained, TOKENIZER, examples)
    guessing = multiple_choice.evaluate(untrained, TOKENIZER, examples)
    assert learnt["chance"] == guessing["chance"] == 0.25
    assert learnt["accuracy"] > 0.75 and learnt["accuracy_norm"] > 0.75
    assert 0.1 < guessing["accuracy"] < 0.4


@nnx.jit
def forward(model, inputs):
    return model(inputs)


def teacher_forced_log_probs(model, tokens):
    """log p(tokens[i] | tokens before it) for i >= 1, from one forward pass, in float64 (inputs
    right-padded to one length, which a causal model's earlier logits do not see: one compile)."""
    inputs = np.zeros((1, 32), np.int32)
    inputs[0, :len(tokens) - 1] = tokens[:-1]
    logits = np.asarray(forward(model, inputs)[0, :len(tokens) - 1], np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return np.take_along_axis(log_probs, np.asarray(tokens)[1:, None], axis=-1)[:, 0]


def choice_log_likelihood(model, context, choice):
    """The log-likelihood of the choice's tokens after BOS + context, and how many there are."""
    whole = TOKENIZER.encode(f"{context} {choice}", bos=True, eos=False)
    context_tokens = TOKENIZER.encode(context, bos=True, eos=False)
    assert whole[:len(context_tokens)] == context_tokens  # the choice adds tokens, it changes none
    scored = teacher_forced_log_probs(model, whole)[len(context_tokens) - 1:]
    return float(scored.sum()), len(scored)


def test_choice_scores_are_the_log_likelihood_of_the_choice_tokens_alone(untrained):
    tokens, weights = multiple_choice.choice_sequence(TOKENIZER, "Now is the winter", "of our discontent", 64)
    assert TOKENIZER.decode(tokens) == "Now is the winter of our discontent"
    scored = [int(token) for token, weight in zip(tokens[1:], weights) if weight]
    assert TOKENIZER.decode(scored).strip() == "of our discontent"
    choices = ["of our discontent", "made glorious summer by this sun of York", "O"]
    sequences = [multiple_choice.choice_sequence(TOKENIZER, "Now is the winter", choice, 64) for choice in choices]
    totals, counts = likelihood.log_likelihoods(untrained, *zip(*sequences))
    expected = [choice_log_likelihood(untrained, "Now is the winter", choice) for choice in choices]
    # A batched program against single forward passes: equal to float32 rounding. Counting the
    # context's tokens too would add whole units of log-likelihood (about -8 a token).
    np.testing.assert_allclose(totals, [total for total, _ in expected], rtol=1e-5)
    assert list(counts) == [count for _, count in expected]


def test_accuracy_norm_is_the_best_log_likelihood_per_character_of_the_choice(untrained):
    # An untrained model gives every token about the same log-likelihood (-log 4096): a one-word
    # choice has the highest sum, a long one the highest sum per character.
    examples = [multiple_choice.Example("Now is the winter", ("O", "of our discontent made glorious summer"), 1),
                multiple_choice.Example("To be, or not to be:", ("that is the question, whether 'tis nobler", "Ay"), 1),
                multiple_choice.Example("Alas, poor Yorick!", ("I knew him, Horatio: a fellow of infinite jest", "O"), 0)]
    right = right_norm = 0
    for example in examples:
        scores = np.array([choice_log_likelihood(untrained, example.context, choice)[0]
                           for choice in example.choices])
        per_character = scores / [len(choice) for choice in example.choices]
        for values in (scores, per_character):  # far from a tie that rounding could flip
            assert abs(values[0] - values[1]) > 0.5
        right += int(np.argmax(scores)) == example.answer
        right_norm += int(np.argmax(per_character)) == example.answer
    assert (right, right_norm) == (1, 2)
    result = multiple_choice.evaluate(untrained, TOKENIZER, examples)
    assert (result["accuracy"], result["accuracy_norm"]) == (1 / 3, 2 / 3)


@pytest.mark.parametrize("line, message", [
    ({"context": "a", "choices": ["b", "c"]}, "no \"answer\""),
    ({"context": "a", "choices": ["b", "c"], "answer": 2}, "not an index into its 2 choices"),
    ({"context": "a", "choices": ["b"], "answer": 0}, "at least two"),
    ({"choices": ["b", "c"], "answer": 0}, "\"context\""),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": ["y", "z"], "answer": 0}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"task.jsonl:2: .*{message}"):
        multiple_choice.read_task(str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        multiple_choice.read_task(str(tmp_path / "empty.jsonl"))


def test_eval_command_writes_the_figures(tmp_path, capsys):
    checkpoint = tmp_path / "model"
    from llama2_jax.checkpoint.convert import export_model

    model = Llama(LlamaConfig.from_preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0))
    export_model(model, str(checkpoint), "orbax", tokenizer_path=str(TOKENIZER.path))
    text = tmp_path / "held_out.jsonl"
    text.write_text("\n".join(json.dumps({"text": document}) for document in DOCUMENTS) + "\n")
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--text", str(text),
                     "--out", str(tmp_path / "ppl.json")]) == 0
    figures = json.loads((tmp_path / "ppl.json").read_text())
    # The same model's figures in this process, on its own device layout: equal to float32 rounding.
    expected = perplexity.perplexity(model, TOKENIZER, DOCUMENTS)
    assert figures["tokens"] == expected["tokens"] and figures["documents"] == len(DOCUMENTS)
    assert figures["nll_per_token"] == pytest.approx(expected["nll_per_token"], rel=1e-5)
    assert figures["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.json")]) == 2
    assert "one of them" in capsys.readouterr().err


def test_eval_names_the_flag_of_a_missing_or_bad_input_before_loading_a_model(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{broken\n")
    for flag, path, problem in [("--text", tmp_path / "absent.txt", "no such file or directory; check --text"),
                                ("--text", tmp_path / "bad.jsonl", "bad.jsonl:1: malformed JSON line"),
                                ("--task", tmp_path / "absent.jsonl", "no such file or directory; check --task")]:
        # No checkpoint either: the inputs are read first.
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "no_model"), flag, str(path),
                         "--out", str(tmp_path / "out.json")]) == 1
        error = capsys.readouterr().err
        assert problem in error and "data." not in error


def test_off_a_terminal_a_long_batch_loop_prints_a_progress_line_and_a_short_one_none(untrained, monkeypatch, capsys):
    perplexity.perplexity(untrained, TOKENIZER, DOCUMENTS, batch_size=1)
    assert capsys.readouterr().err == ""  # done in well under PROGRESS_LINE_SECONDS
    monkeypatch.setattr("llama2_jax.metrics.PROGRESS_LINE_SECONDS", 0.0)  # every batch is "long"
    perplexity.perplexity(untrained, TOKENIZER, DOCUMENTS, batch_size=1)
    lines = capsys.readouterr().err.splitlines()
    total = lines[-1].split()[1].split("/")[1]
    assert len(lines) > 1 and all(line.startswith("sequence ") for line in lines)
    assert lines[-1].startswith(f"sequence {total}/{total} eta 0m00s")
