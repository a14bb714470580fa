"""Supervised fine-tuning: the answer-only loss, packing, cutting by length, Ghost Attention data, and
a run that can only succeed if prompt tokens stay out of the loss."""

import json
import random

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.dialogs import CUT, KEPT, SKIPPED, DialogPieces, scan
from llama2_jax.data.gatt import Conversation, converse, recall_by_turn, training_dialogs
from llama2_jax.data.instructions import Instruction, InstructionSet
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.metrics import read_metrics
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, LlamaRewardModel
from llama2_jax.train.losses import weighted_cross_entropy

TOKENIZER = Tokenizer()
SYSTEM = {"role": "system", "content": "Answer briefly."}


def exchange(question, answer, train=True):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "train": train}]


DIALOG = [SYSTEM, *exchange("Who says: 'To be, or not to be'?", "HAMLET."),
          *exchange("Which play is that from?", "Hamlet."), *exchange("And the next line?", "That is the question")]


def test_loss_weights_are_the_answer_mask_token_for_token():
    (piece,), outcome = DialogPieces(TOKENIZER, 512).encode(DIALOG)
    encoded = encode_dialog(TOKENIZER, DIALOG)
    assert outcome == KEPT
    np.testing.assert_array_equal(piece["inputs"], encoded.tokens[:-1])
    np.testing.assert_array_equal(piece["targets"], encoded.tokens[1:])
    np.testing.assert_array_equal(piece["loss_weights"], encoded.loss_mask[1:])
    # The weighted targets are exactly the three answers (with the format's trailing space), each
    # followed by EOS, and nothing else.
    weighted = [int(token) for token, weight in zip(piece["targets"], piece["loss_weights"]) if weight]
    answers = [TOKENIZER.encode(f"[/INST] {text} ", bos=False, eos=True)[len(TOKENIZER.encode("[/INST]", bos=False)):]
               for text in ("HAMLET.", "Hamlet.", "That is the question")]
    assert weighted == sum(answers, [])


def test_an_answer_marked_not_to_train_has_no_weight():
    dialog = [*exchange("first?", "one", train=False), *exchange("second?", "two")]
    (piece,), _ = DialogPieces(TOKENIZER, 512).encode(dialog)
    weighted = [int(token) for token, weight in zip(piece["targets"], piece["loss_weights"]) if weight]
    assert TOKENIZER.decode(weighted[:-1]).strip() == "two" and weighted[-1] == TOKENIZER.eos_id


def test_long_dialogs_lose_their_oldest_turns_or_are_skipped_and_counted():
    whole = len(encode_dialog(TOKENIZER, DIALOG).tokens) - 1
    last_two = len(encode_dialog(TOKENIZER, [SYSTEM, *DIALOG[3:]]).tokens) - 1
    (piece,), outcome = DialogPieces(TOKENIZER, whole - 1).encode(DIALOG)
    assert outcome == CUT and len(piece["inputs"]) == last_two  # the oldest exchange went, the system prompt stayed
    assert TOKENIZER.decode(piece["inputs"]).startswith("[INST] <<SYS>>\nAnswer briefly.")
    too_long = [*exchange("short?", "word " * 300)]
    assert DialogPieces(TOKENIZER, 64).encode(too_long) == ([], SKIPPED)
    untrained_tail = [*exchange("a " * 40, "b"), *exchange("c?", "d", train=False)]
    assert DialogPieces(TOKENIZER, 12).encode(untrained_tail) == ([], SKIPPED)  # no trained answer is left
    counts = scan([{"messages": dialog} for dialog in (DIALOG, DIALOG, too_long)], DialogPieces(TOKENIZER, whole - 1))
    assert (counts.kept, counts.cut, counts.skipped) == (0, 2, 1)
    assert counts.tokens == 2 * last_two


def test_changing_one_packed_example_leaves_the_others_unchanged():
    model = Llama(LlamaConfig.from_preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0))
    encoder = DialogPieces(TOKENIZER, 256)

    def packed_row(first_dialog):
        """DIALOG's logits and loss when packed after `first_dialog`: the example that changes comes
        first, so that only the segment mask, not causality, keeps it from DIALOG."""
        (first,), _ = encoder.encode(first_dialog)
        (second,), _ = encoder.encode(DIALOG)
        row = {name: np.concatenate([first[name], second[name]])[None] for name in first}
        row["segment_ids"] = np.concatenate([np.full(len(first["inputs"]), 1), np.full(len(second["inputs"]), 2)])[None]
        row["positions"] = np.concatenate([np.arange(len(first["inputs"])), np.arange(len(second["inputs"]))])[None]
        second_only = row["loss_weights"] * (row["segment_ids"] == 2)
        logits = model(jnp.asarray(row["inputs"]), jnp.asarray(row["positions"]), jnp.asarray(row["segment_ids"]))
        loss, _ = weighted_cross_entropy(logits, jnp.asarray(row["targets"]), jnp.asarray(second_only))
        return np.asarray(logits[0, len(first["inputs"]):]), float(loss)

    logits, loss = packed_row(exchange("Who says 'Alas'?", "YORICK."))
    other_logits, other_loss = packed_row(exchange("Something else entirely, and longer?", "No."))
    # Rows of other lengths run as other programs, which may add up in another order: equal to float32
    # rounding (a few 1e-7 here), where attending across the segments moves DIALOG's logits by tenths.
    np.testing.assert_allclose(other_logits, logits, rtol=1e-5, atol=1e-5)
    assert other_loss == pytest.approx(loss, rel=1e-5)


def conversation(answers=()):
    instruction = InstructionSet((Instruction("character", "HAMLET"),), short=True)
    return Conversation("Be brief.", ["q1", "q2", "q3"], instruction, every_turn=True, answers=list(answers))


def test_ghost_attention_dialogs_keep_the_instruction_first_and_train_the_last_answer():
    # The third answer does not follow the instruction: that turn and any after it are not taught.
    dialogs = training_dialogs(conversation(["HAMLET: a1", "HAMLET: a2", "a3"]))
    assert dialogs == [
        [{"role": "system", "content": "Be brief.", "train": False},
         {"role": "user", "content": "q1\n\nFigure: HAMLET", "train": False},
         {"role": "assistant", "content": "HAMLET: a1", "train": True}],
        [{"role": "system", "content": "Be brief.", "train": False},
         {"role": "user", "content": "q1\n\nFigure: HAMLET", "train": False},
         {"role": "assistant", "content": "HAMLET: a1", "train": False},
         {"role": "user", "content": "q2", "train": False},
         {"role": "assistant", "content": "HAMLET: a2", "train": True}],
    ]


def test_conversations_are_answered_turn_by_turn_with_the_instruction_in_every_turn():
    seen = []

    def answer(conversations, turn):
        dialogs = [conversation.messages(turn) for conversation in conversations]
        seen.append(dialogs)
        return [f"HAMLET: answer {len(dialog) // 2}" for dialog in dialogs]

    talk = conversation()
    converse([talk], answer, TOKENIZER, context=256, answer_tokens=8)
    assert [len(call) for call in seen] == [1, 1, 1]
    assert [message["content"] for message in seen[2][0] if message["role"] == "user"] == [
        "q1\n\nFigure: HAMLET", "q2\n\nFigure: HAMLET", "q3\n\nFigure: HAMLET"]
    assert recall_by_turn([talk]) == {1: (1, 1), 2: (1, 1), 3: (1, 1)}
    # A context that holds two turns' prompts but not the third stops the conversation there.
    third = len(encode_dialog(TOKENIZER, talk.messages(3)).tokens)
    short = conversation()
    converse([short], answer, TOKENIZER, context=third + 7, answer_tokens=8)
    assert len(short.answers) == 2


def sft_argv(pretrained, workdir, path, tmp_path, *extra):
    return ["sft", "--config=configs/sft.py:tiny", f"--config.init_checkpoint={pretrained}", f"--workdir={workdir}",
            "--config.data.dataset=same_answer", f"--config.data.paths=('{path}',)", "--config.data.format=chat",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.seq_len=128", *extra]


class InitialWeightsRead(Exception):
    """Raised by the initial checkpoint's loader where a run must not read it."""


def test_the_same_answer_to_random_prompts_is_learnt_to_near_zero_loss(pretrained, tmp_path, monkeypatch):
    """Only possible if the random-word prompts are out of the loss: they cannot be predicted. The run
    is stopped halfway and rerun, as after a crash: the rerun resumes from its own checkpoint."""
    rng = random.Random(0)
    words = [line.split()[0] for line in open(TOKENIZER.path.with_suffix(".vocab"), encoding="utf-8")
             if line.split()[0].startswith("\u2581") and len(line.split()[0]) > 3]
    path = tmp_path / "dialogs.jsonl"
    with open(path, "w") as out:
        for _ in range(400):
            question = " ".join(rng.choice(words)[1:] for _ in range(rng.randint(5, 20)))
            out.write(json.dumps({"messages": exchange(question, "Now is the winter of our discontent.")}) + "\n")
    workdir = tmp_path / "sft"
    argv = sft_argv(pretrained, workdir, path, tmp_path, "--config.data.holdout_fraction=0.1",
                    "--config.train.epochs=0", "--config.train.steps=40", "--config.train.eval_every=40",
                    "--config.train.log_every=10", "--config.sft.eval_prompts=2", "--config.optimizer.peak_lr=3e-3",
                    "--config.optimizer.end_lr_fraction=1.0")
    # The first half, on the 40-step schedule of the whole run.
    assert cli.main([*argv, "--config.train.steps=20", "--config.optimizer.decay_steps=40",
                     "--config.train.eval_every=0", "--config.sft.eval_prompts=0"]) == 0
    with open(workdir / "metrics.jsonl", "a") as metrics:  # a crash after step 30 was logged, before a checkpoint
        metrics.write(json.dumps({"step": 30, "loss": 99.0}) + "\n")

    def initial_weights(*args, **keywords):
        raise InitialWeightsRead("a rerun read the initial checkpoint's weights")

    monkeypatch.setattr("llama2_jax.stages.initial.load_pretrained", initial_weights)
    assert cli.main(argv) == 0
    records = read_metrics(workdir)
    assert [(record["step"], record["loss"] < 99) for record in records if "loss" in record] == [
        (10, True), (20, True), (30, True), (40, True)]
    evaluations = [record for record in records if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [40]
    assert evaluations[-1]["eval_loss"] < 0.05
    answers = [json.loads(line) for line in open(workdir / "answers.jsonl")]
    assert [record["answer"] for record in answers] == ["Now is the winter of our discontent."] * 2


class Configured(Exception):
    """Raised instead of training, with the steps the stage would train for."""


def test_steps_are_epochs_of_the_packed_rows_of_the_training_dialogs(pretrained, tmp_path, monkeypatch):
    dialog = exchange("Who says 'Alas, poor Yorick'?", "HAMLET, in the graveyard.")
    assert len(encode_dialog(TOKENIZER, dialog).tokens) - 1 == 34  # three of them fit in a row of 128
    too_long = exchange("word " * 200, "No.")  # skipped: no piece, no row
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in [dialog] * 50 + [too_long] * 2))

    def train(config, workdir, task):
        raise Configured(config.train.steps)

    monkeypatch.setattr("llama2_jax.stages.sft.train", train)
    with pytest.raises(Configured) as configured:
        cli.main(sft_argv(pretrained, tmp_path / "sft", path, tmp_path, "--config.train.global_batch_size=8",
                          "--config.train.epochs=2", "--config.train.eval_every=0", "--config.sft.eval_prompts=0",
                          "--config.data.holdout_fraction=0"))
    # 50 dialogs, three a row: 17 rows an epoch (by tokens alone, 50 x 34 / 128, they would fill 14),
    # and two epochs of 17 rows in batches of 8 take 5 steps.
    assert configured.value.args == (5,)


def test_an_initial_checkpoint_of_another_kind_or_a_model_key_that_contradicts_it_is_one_clear_error(pretrained, tmp_path, capsys):
    from llama2_jax.checkpoint.convert import export_model

    reward_model = tmp_path / "reward_model"
    export_model(LlamaRewardModel(LlamaConfig.from_preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0)),
                 str(reward_model), "orbax", tokenizer_path=str(TOKENIZER.path))
    path = gatt_dialogs_file(tmp_path / "dialogs.jsonl")
    for init, extra, code, message in (
            (reward_model, (), 1, f"{reward_model} holds a reward model, not a language model; set "
             "--config.init_checkpoint to a language model (a pretraining or SFT workdir, or Meta's or Hugging "
             "Face's weights)"),
            (pretrained, ("--config.model.n_layers=2", "--config.model.rope_theta=1e6"), 2,
             f"the checkpoint says what the model is: model.n_layers=2 but {pretrained} has 4; "
             f"model.rope_theta=1000000.0 but {pretrained} has 10000.0; leave those model keys unset"),
            (pretrained, ("--config.model.max_seq_len=512",), 2,
             f"the checkpoint says what the model is: model.max_seq_len=512 but {pretrained} has 256; leave "
             "those model keys unset"),
            (pretrained, ("--config.train.seq_len=512",), 2,
             f"train.seq_len 512 is longer than the 256 positions of {pretrained}; set --config.train.seq_len to "
             "256 or less")):
        assert cli.main(sft_argv(init, tmp_path / "sft", path, tmp_path, *extra)) == code
        error = capsys.readouterr().err
        assert error == f"error: {message}\n"
    assert not (tmp_path / "sft").exists()


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    from llama2_jax.checkpoint.convert import export_model

    path = tmp_path_factory.mktemp("policy") / "policy"
    export_model(Llama(LlamaConfig.from_preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0)), str(path), "orbax",
                 tokenizer_path=str(TOKENIZER.path))
    return path


def gatt_dialogs_file(path):
    dialogs = [[*exchange("Who says 'Alas'?", "HAMLET."), *exchange("Which play?", "Hamlet."),
                *exchange("And 'Adieu'?", "GHOST.")], [*exchange("Which play is 'Out, spot' from?", "Macbeth."),
                                                        *exchange("Who says it?", "LADY MACBETH.")]]
    path.write_text("".join(json.dumps({"messages": dialog}) + "\n" for dialog in dialogs))
    return path


def test_gatt_command_writes_the_policys_answers_as_training_dialogs(random_policy, tmp_path, monkeypatch):
    from llama2_jax.commands import gatt

    hamlet = InstructionSet((Instruction("character", "HAMLET"),), short=True)
    monkeypatch.setattr(InstructionSet, "sample", classmethod(lambda cls, rng, characters, plays: hamlet))
    # A policy that follows the instruction whenever the turn it answers carries it.
    monkeypatch.setattr(gatt, "answers_to_dialogs", lambda model, tokenizer, dialogs, samples, **keywords: [
        ["HAMLET: yes" if "Figure: HAMLET" in dialog[-1]["content"] else "no"] * samples for dialog in dialogs])
    out = tmp_path / "gatt.jsonl"
    assert cli.main(["gatt", "--checkpoint", str(random_policy), "--dialogs", str(gatt_dialogs_file(tmp_path / "d.jsonl")),
                     "--out", str(out)]) == 0
    examples = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert [len(example) for example in examples] == [2, 4, 6, 2, 4]  # one per turn of each dialog
    for example in examples:
        assert [m["train"] for m in example] == [False] * (len(example) - 1) + [True]
        users = [m["content"] for m in example if m["role"] == "user"]
        assert users[0].endswith("\n\nFigure: HAMLET") and not any("HAMLET" in u for u in users[1:])


def test_gatt_eval_prints_the_recall_of_each_turn(random_policy, tmp_path, monkeypatch, capsys):
    from llama2_jax.commands import gatt

    # A model that follows the instruction only while it is in the turn being answered.
    monkeypatch.setattr(gatt, "answers_to_dialogs", lambda model, tokenizer, dialogs, samples, **keywords: [
        [InstructionSet((Instruction("character", "X"),)).apply("x") if len(dialog) == 1 else "plain"] * samples
        for dialog in dialogs])
    monkeypatch.setattr(InstructionSet, "sample", classmethod(
        lambda cls, rng, characters, plays: InstructionSet((Instruction("character", "X"),))))
    out = tmp_path / "recall.json"
    assert cli.main(["gatt-eval", "--checkpoint", str(random_policy), "--dialogs",
                     str(gatt_dialogs_file(tmp_path / "d.jsonl")), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 100 % (2) |" in printed
    # Which model and which turn, as each starts.
    assert printed.splitlines()[:2] == [f"model 1 of 1: {random_policy}", "turn 1: answering 2 dialogs"]
    recall = json.loads(out.read_text())[str(random_policy)]
    assert recall == {"1": {"followed": 2, "answers": 2}, "2": {"followed": 0, "answers": 2},
                      "3": {"followed": 0, "answers": 1}}


def test_gatt_keeps_the_first_of_several_sampled_answers_that_follows(random_policy, tmp_path, monkeypatch):
    from llama2_jax.commands import gatt

    hamlet = InstructionSet((Instruction("character", "HAMLET"),), short=True)
    monkeypatch.setattr(InstructionSet, "sample", classmethod(lambda cls, rng, characters, plays: hamlet))
    # Only the third answer sampled for a turn follows the instruction.
    monkeypatch.setattr(gatt, "answers_to_dialogs", lambda model, tokenizer, dialogs, samples, **keywords: [
        ["HAMLET: third" if sample == 2 else "other" for sample in range(samples)] for _ in dialogs])
    dialogs = gatt_dialogs_file(tmp_path / "d.jsonl")
    for samples, expected in (("3", 5), ("2", 0)):
        out = tmp_path / f"gatt{samples}.jsonl"
        assert cli.main(["gatt", "--checkpoint", str(random_policy), "--dialogs", str(dialogs), "--out", str(out),
                         "--samples", samples]) == 0
        assert len(out.read_text().splitlines()) == expected


def test_gatt_with_reward_models_keeps_the_best_scored_answer_that_follows(random_policy, tmp_path, monkeypatch,
                                                                           capsys):
    from llama2_jax import reward
    from llama2_jax.checkpoint.convert import export_model
    from llama2_jax.commands import gatt

    hamlet = InstructionSet((Instruction("character", "HAMLET"),), short=True)
    monkeypatch.setattr(InstructionSet, "sample", classmethod(lambda cls, rng, characters, plays: hamlet))
    # Sample k answers "HAMLET: k" except the second, which does not follow; the reward model prefers
    # the third, which is neither the first sampled nor the first that follows.
    monkeypatch.setattr(gatt, "answers_to_dialogs", lambda model, tokenizer, dialogs, samples, **keywords: [
        ["other" if sample == 1 else f"HAMLET: {sample}" for sample in range(samples)] for _ in dialogs])
    scored = []

    def combined_scores(models, tokenizer, dialogs, responses, **keywords):
        scored.append(list(responses))
        return [{"HAMLET: 2": 0.9, "HAMLET: 0": 0.4}.get(response, 0.1) for response in responses]

    monkeypatch.setattr(reward, "combined_scores", combined_scores)
    helpfulness = tmp_path / "rm"
    export_model(LlamaRewardModel(LlamaConfig.from_preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(1)),
                 str(helpfulness), "orbax", tokenizer_path=str(TOKENIZER.path))
    dialogs, out = gatt_dialogs_file(tmp_path / "d.jsonl"), tmp_path / "gatt.jsonl"
    assert cli.main(["gatt", "--checkpoint", str(random_policy), "--dialogs", str(dialogs), "--out", str(out),
                     "--samples", "4", "--reward-models", str(helpfulness)]) == 0
    assert all(turn == ["HAMLET: 0", "HAMLET: 2", "HAMLET: 3"] * (len(turn) // 3) for turn in scored)  # followers only
    answers = [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()]
    assert answers == ["HAMLET: 2"] * 5
    assert gatt.best_reply(["a", "b"], [float("nan"), 0.1], "c") == "b" and gatt.best_reply([], [], "c") == "c"

    other = tmp_path / "other_rm"
    export_model(LlamaRewardModel(LlamaConfig.from_preset("tiny", compute_dtype="float32", vocab_size=256),
                                  rngs=nnx.Rngs(2)), str(other), "orbax", tokenizer_path=str(TOKENIZER.path))
    for path, message in ((other, "reads another vocabulary than the policy"), (random_policy, "holds a language model")):
        assert cli.main(["gatt", "--checkpoint", str(random_policy), "--dialogs", str(dialogs), "--out",
                         str(tmp_path / "bad.jsonl"), "--reward-models", str(path)]) == 1
        assert message in capsys.readouterr().err
