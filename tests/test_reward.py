"""Reward models: the ranking loss against a hand computation, which token is scored, the metric
sums, scoring exactly as training sees a pair, bad input, and a run that can only succeed by
reading the last words of a response."""

import json
import math
import random
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from configs.reward import get_config
from llama2_jax import cli, reward, sharding
from llama2_jax.checkpoint.load import load_pretrained, load_tokenizer
from llama2_jax.data import sources
from llama2_jax.data.pipeline import make_batches
from llama2_jax.data.preferences import CUT, KEPT, PreferencePairs, preference_spec, scan
from llama2_jax.data.records import DataError, parse_preference_record
from llama2_jax.data.tokenizer import Tokenizer, train_tokenizer
from llama2_jax.metrics import MetricsWriter, read_metrics
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import LlamaRewardModel
from llama2_jax.train.preference_loss import make_preference_loss, pair_scores
from llama2_jax.train.step import normalised_metrics

TOKENIZER = Tokenizer()
MODEL_CONFIG = LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=64)
# The paper's margin tables, by rating level (strongest first), written out by hand.
PAPER_MARGINS = {"none": [0, 0, 0, 0], "small": [1, 2 / 3, 1 / 3, 0], "large": [3, 2, 1, 0]}


@pytest.fixture(scope="module")
def model():
    return LlamaRewardModel(MODEL_CONFIG, rngs=nnx.Rngs(0))


def pair_batch(sequences, ratings, weights=None, safety=None, length=24):
    """A batch of pairs, each `(chosen tokens, rejected tokens)`, right-padded to `length`."""
    batch = {name: np.zeros((len(sequences), 2, length), np.int32) for name in ("inputs", "positions", "segment_ids")}
    for row, pair in enumerate(sequences):
        for side, tokens in enumerate(pair):
            batch["inputs"][row, side, :len(tokens)] = tokens
            batch["positions"][row, side, :len(tokens)] = np.arange(len(tokens))
            batch["segment_ids"][row, side, :len(tokens)] = 1
    safety = safety or [(1, 1)] * len(sequences)
    batch["rating"] = np.asarray(ratings, np.int32)
    batch["chosen_safe"] = np.asarray([chosen for chosen, _ in safety], np.int32)
    batch["rejected_safe"] = np.asarray([rejected for _, rejected in safety], np.int32)
    batch["pair_weight"] = np.asarray(weights or [1.0] * len(sequences), np.float32)
    return {name: jnp.asarray(value) for name, value in batch.items()}


def alone(model, tokens) -> float:
    """The model's score of one unpadded sequence."""
    return float(_score_rows(model, jnp.asarray([tokens], jnp.int32))[0])


@nnx.jit
def _score_rows(model, tokens):
    return model(tokens)


def random_pairs(count, seed=0):
    """Pairs of random sequences, of a few lengths (each length compiles the model once)."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(3, MODEL_CONFIG.vocab_size, rng.choice([5, 11, 23])).tolist() for _ in range(2))
            for _ in range(count)]


@pytest.fixture(scope="module")
def scored_pairs(model):
    """Pairs of random sequences, and each sequence's score when the model runs on it alone."""
    pairs = random_pairs(6)
    return pairs, [(alone(model, chosen), alone(model, rejected)) for chosen, rejected in pairs]


@pytest.mark.parametrize("margin, centering, safety_aux", [
    ("none", 0.0, 0.0), ("small", 0.0, 0.0), ("large", 0.0, 0.0), ("small", 0.05, 0.0), ("small", 0.0, 0.5)])
def test_the_loss_is_the_ranking_loss_computed_by_hand(model, scored_pairs, margin, centering, safety_aux):
    pairs, scores = scored_pairs
    ratings, weights = [0, 1, 2, 3, -1, 2], [1, 1, 1, 1, 1, 0]  # an unrated pair and a row of padding
    # Safety labels (chosen, rejected): 1 safe, 0 unsafe, -1 none (no auxiliary term for that response).
    safety = [(1, 0), (1, 1), (0, 0), (-1, -1), (1, -1), (0, 1)]
    loss = make_preference_loss(margin=margin, centering=centering, safety_aux=safety_aux)
    loss_sum, sums = loss(model, pair_batch(pairs, ratings, weights, safety))
    expected = auxiliary = 0.0
    for (r_chosen, r_rejected), rating, weight, labels in zip(scores, ratings, weights, safety):
        m = PAPER_MARGINS[margin][rating] if rating >= 0 else 0.0  # unrated: margin 0
        ranking = math.log1p(math.exp(-(r_chosen - r_rejected - m)))  # -log σ(x) = log(1 + e^-x)
        # Binary cross-entropy of σ(r) against the label: -log σ(r) if safe, -log(1 - σ(r)) = -log σ(-r) if not.
        cross_entropy = sum(math.log1p(math.exp(-r if safe else r)) for r, safe in zip((r_chosen, r_rejected), labels)
                            if safe >= 0)
        auxiliary += weight * cross_entropy
        expected += weight * (ranking + centering * (r_chosen + r_rejected) ** 2 + safety_aux * cross_entropy)
    assert float(sums["weight"]) == 5
    np.testing.assert_allclose(float(loss_sum), expected, rtol=2e-5)
    if safety_aux:
        np.testing.assert_allclose(float(sums["safety_aux_loss"]), auxiliary, rtol=2e-5)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_the_scored_token_is_the_last_real_token(model, padding):
    tokens = [1, 400, 17, 2003, 9, 2]
    length = len(tokens) + (0 if padding == "none" else 5)
    start = length - len(tokens) if padding == "left" else 0
    row = {name: np.zeros((1, length), np.int32) for name in ("inputs", "positions", "segment_ids")}
    row["inputs"][0] = 77  # padding of any id
    row["inputs"][0, start:start + len(tokens)] = tokens
    row["positions"][0, start:start + len(tokens)] = np.arange(len(tokens))
    row["segment_ids"][0, start:start + len(tokens)] = 1
    row = {name: jnp.asarray(value) for name, value in row.items()}
    score = float(model(row["inputs"], positions=row["positions"], segment_ids=row["segment_ids"])[0])
    hidden = model.hidden_states(row["inputs"], row["positions"], row["segment_ids"])
    last = start + len(tokens) - 1
    projected = float(hidden[0, last].astype(jnp.float32) @ model.score.kernel[...][:, 0])
    np.testing.assert_allclose(score, projected, rtol=1e-6)
    np.testing.assert_allclose(score, alone(model, tokens), atol=1e-5)


def test_both_sequences_of_packed_pairs_are_scored_as_if_alone(model, scored_pairs):
    pairs, scores = scored_pairs
    chosen, rejected = pair_scores(model, pair_batch(pairs, [0] * len(pairs)))
    np.testing.assert_allclose(np.stack([chosen, rejected], axis=1), scores, atol=1e-5)


class FixedScores:
    """A stand-in model: the score of a sequence is a value looked up by its first token."""

    def __init__(self, scores):
        self.scores = jnp.asarray(scores, jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.scores[tokens[:, 0]]


def test_accuracy_per_level_and_safety_bin_recall_and_histograms_are_counted_right():
    # Pair k: chosen is token 2k, rejected 2k + 1, scored by the table below.
    scores = [2.0, -1.0, 0.5, 1.0, 0.3, -0.2, -3.0, 0.1, 1.5, 1.4, 0.0, 0.0, 4.0, -4.0, 9.0, 9.0]
    ratings = [0, 0, 1, 3, 3, 2, -1, 1]
    safety = [(1, 0), (1, 1), (0, 0), (1, 0), (0, 1), (1, 1), (-1, -1), (0, 0)]
    weights = [1, 1, 1, 1, 1, 1, 1, 0]  # the last pair is padding
    sequences = [([2 * k], [2 * k + 1]) for k in range(8)]
    _, sums = make_preference_loss()(FixedScores(scores), pair_batch(sequences, ratings, weights, safety, length=1))
    values = jax.device_get(normalised_metrics(sums))
    pairs = [(scores[2 * k], scores[2 * k + 1]) for k in range(7)]
    # Right: pairs 0, 2, 4 and 6; a tie (pair 5) is not.
    assert values["weight"] == 7 and values["accuracy"] == pytest.approx(4 / 7)
    assert values["accuracy_significantly_better"] == 0.5 and values["accuracy_significantly_better_weight"] == 2
    assert values["accuracy_better"] == 1.0 and values["accuracy_better_weight"] == 1
    assert values["accuracy_slightly_better"] == 0.0 and values["accuracy_slightly_better_weight"] == 1
    assert values["accuracy_negligibly_better_or_unsure"] == 0.5
    assert values["accuracy_safe_unsafe"] == 0.5 and values["accuracy_safe_unsafe_weight"] == 2
    assert values["accuracy_both_safe"] == 0.0 and values["accuracy_both_safe_weight"] == 2
    assert values["accuracy_both_unsafe"] == 1.0 and values["accuracy_unsafe_safe"] == 1.0
    assert values["chosen_score"] == pytest.approx(np.mean([c for c, _ in pairs]))
    assert values["score_margin"] == pytest.approx(np.mean([c - r for c, r in pairs]))
    # Unsafe answers: the rejected of pairs 0 (-1.0) and 3 (0.1), both of pair 2 (0.3, -0.2), the chosen of
    # pair 4 (1.5); scored below 0 (σ below 0.5): two of them.
    assert values["unsafe_recall_weight"] == 5 and values["unsafe_recall"] == pytest.approx(2 / 5)
    chosen_bins = np.bincount([min(int(20 / (1 + math.exp(-c))), 19) for c, _ in pairs], minlength=20) / 7
    np.testing.assert_allclose(values["chosen_score_histogram"], chosen_bins, atol=1e-7)


def preference_records(count, seed=0, closing=("and so, good night.", "and so, be gone.")):
    """Pairs whose two responses share random words and differ only in their closing words."""
    rng = random.Random(seed)
    words = [line.split()[0][1:] for line in open(TOKENIZER.path.with_suffix(".vocab"), encoding="utf-8")
             if line.split()[0].startswith("\u2581") and len(line.split()[0]) > 3]
    records = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        records.append({"prompt": prompt, "chosen": f"{body} {closing[0]}", "rejected": f"{body} {closing[1]}",
                        "rating": rng.choice(["significantly_better", "better", "slightly_better"])})
    return records


def test_score_equals_the_scalar_the_training_step_sees(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(ici_data=4, ici_fsdp=2, ici_tensor=1))
    model = sharding.create_model(MODEL_CONFIG, mesh, sharding.DEFAULT_RULES, 3, LlamaRewardModel)
    records = [parse_preference_record(record) for record in preference_records(8, seed=5)]
    records[0]["prompt"] = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"},
                            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Farewell?"}]
    data = get_config("tiny").data
    data.shuffle = False
    batches = make_batches(data, records, preference_spec(64), PreferencePairs(TOKENIZER, 64, safety_rule=False), global_batch_size=8, mesh=mesh, seed=0, num_epochs=1)
    graphdef, state = nnx.split(model)
    with sharding.logical_context(mesh, sharding.DEFAULT_RULES):
        chosen, rejected = jax.jit(lambda state, batch: pair_scores(nnx.merge(graphdef, state), batch))(
            state, next(batches))
    prompts = [record["prompt"] for record in records]
    responses = [record["chosen"] for record in records] + [record["rejected"] for record in records]
    scored = reward.score(model, TOKENIZER, prompts * 2, responses, batch_size=4)
    np.testing.assert_allclose(scored, jax.nn.sigmoid(np.concatenate([chosen, rejected])), atol=1e-6)


def example(chosen="To be.", rejected="Not to be.", rating=0, chosen_safe=1, rejected_safe=1, prompt=None):
    return {"prompt": prompt or [{"role": "user", "content": "Which?"}], "chosen": chosen, "rejected": rejected,
            "rating": rating, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe}


def test_pairs_that_cannot_be_used_are_skipped_and_counted_by_reason():
    encoder = PreferencePairs(TOKENIZER, 40, safety_rule=True)
    long_turn = " ".join(["word"] * 30)
    history = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "Yes."},
               {"role": "user", "content": "Which?"}]
    pairs = [example(), example(chosen=" Not to be.", rejected="Not to be. "), example(rating=-1),
             example(chosen_safe=0, rejected_safe=1), example(chosen_safe=0, rejected_safe=0),
             example(chosen=long_turn), example(prompt=history), example(chosen="[INST] to be")]
    counts = scan("pairs", pairs, encoder)
    assert (counts.kept, counts.cut) == (3, 1)  # the unrated pair is kept: it trains with margin 0
    assert counts.skipped == {"identical": 1, "unsafe_chosen": 1, "too_long": 1, "malformed": 1}
    assert "8 pairs: 3 kept, 1 kept with their oldest turns dropped" in counts.summary()
    assert "1 chosen unsafe and rejected safe (the safety rule)" in counts.summary()
    assert encoder.encode(example(prompt=history))[1] == CUT
    relaxed = PreferencePairs(TOKENIZER, 40, safety_rule=False)
    assert relaxed.encode(pairs[3])[1] == KEPT
    # Pairs without safety labels pass the rule; a dataset labelled only in part cannot have it applied.
    unlabelled = example(chosen_safe=-1, rejected_safe=-1)
    assert scan("helpfulness", [unlabelled] * 3, encoder).kept == 3
    with pytest.raises(DataError, match="mixed: 1 of its 3 pairs have no safety labels.*reward.safety_rule=false"):
        scan("mixed", [example(), unlabelled, example(chosen="Be.")], encoder)
    assert scan("mixed", [example(), unlabelled, example(chosen="Be.")], relaxed).kept == 3
    with pytest.raises(DataError, match="rating 7, which is none of the four levels"):
        encoder.encode(example(rating=7))


def write_pairs(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def reward_argv(init, workdir, data_path, tmp_path, *extra):
    return ["reward", "--config=configs/reward.py:tiny", f"--config.init_checkpoint={init}", f"--workdir={workdir}",
            "--config.data.dataset=closing_words", f"--config.data.paths=('{data_path}',)",
            "--config.data.format=preferences", "--config.data.holdout_fraction=0.1",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.reward.mix=()", "--config.train.seq_len=64",
            "--config.train.global_batch_size=16", "--config.train.log_every=10", *extra]


def test_bad_input_is_one_clear_error(pretrained, tmp_path, capsys):
    def error_of(*extra, dataset="closing_words", records=None):
        data = write_pairs(tmp_path / f"{dataset}.jsonl", records or preference_records(20))
        code = cli.main(reward_argv(pretrained, tmp_path / "run", data, tmp_path, "--config.train.steps=1",
                                    f"--config.data.dataset={dataset}", *extra))
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return code, error

    other = train_tokenizer(["Sphinx of black quartz, judge my vow."] * 200, tmp_path / "other", vocab_size=300,
                            from_files=False)
    code, error = error_of(f"--config.data.tokenizer_path={other.path}")
    assert code == 1 and "is not the tokenizer of" in error and "leave data.tokenizer_path empty" in error
    partly_labelled = [dict(record, chosen_safe=True, rejected_safe=False) if index % 2 else record
                       for index, record in enumerate(preference_records(20))]
    code, error = error_of(dataset="partly_labelled", records=partly_labelled)
    assert code == 1 and "partly_labelled: " in error and "pairs have no safety labels" in error
    assert "--config.reward.safety_rule=false" in error
    code, error = error_of("--config.reward.mix=(('closing_words', 1.0),)")
    assert code == 2 and "leaving nothing for data.dataset" in error
    code, error = error_of("--config.reward.margin=medium")
    assert code == 2 and "choose one of none, small, large" in error
    code, error = error_of("--config.model.dim=64")
    assert code == 2 and f"model.dim=64 but {pretrained} has 128; leave those model keys unset" in error


class InitialWeightsRead(Exception):
    """Raised by the initial checkpoint's loader where a run must not read it."""


def test_pairs_told_apart_by_their_last_words_are_learnt_and_scored_alike(pretrained, tmp_path, monkeypatch):
    """The run is stopped halfway and rerun: the rerun resumes from its own checkpoint, with the score
    head it drew, never from the initial weights and a new head."""
    data = write_pairs(tmp_path / "pairs.jsonl", preference_records(400))
    workdir = tmp_path / "reward"
    argv = reward_argv(pretrained, workdir, data, tmp_path, "--config.reward.margin=none", "--config.train.epochs=0",
                       "--config.train.steps=40", "--config.train.eval_every=40", "--config.optimizer.peak_lr=1e-3")
    assert cli.main([*argv, "--config.train.steps=20", "--config.optimizer.decay_steps=40",
                     "--config.train.eval_every=0"]) == 0

    def initial_weights(*args, **keywords):
        raise InitialWeightsRead("a rerun read the initial checkpoint's weights")

    monkeypatch.setattr("llama2_jax.stages.initial.load_pretrained", initial_weights)
    assert cli.main(argv) == 0
    assert [record["step"] for record in read_metrics(workdir) if "loss" in record] == [10, 20, 30, 40]
    evaluations = [record for record in read_metrics(workdir) if "eval_accuracy" in record]
    assert evaluations[-1]["step"] == 40
    assert evaluations[-1]["eval_accuracy"] >= 0.9
    assert len(evaluations[-1]["eval_chosen_score_histogram"]) == 20
    assert (workdir / "score_histogram.png").stat().st_size > 0
    model = load_pretrained(workdir)
    assert isinstance(model, LlamaRewardModel) and (workdir / "tokenizer.model").is_file()
    fresh = preference_records(20, seed=1)
    tokenizer = load_tokenizer(workdir)
    prompts = [record["prompt"] for record in fresh]
    chosen = reward.score(model, tokenizer, prompts, [record["chosen"] for record in fresh])
    rejected = reward.score(model, tokenizer, prompts, [record["rejected"] for record in fresh])
    assert np.all(chosen > rejected) and np.all((0 < chosen) & (chosen < 1))
    # The command scores a file the same way.
    write_pairs(tmp_path / "fresh.jsonl", [{"prompt": record["prompt"], "response": record["chosen"]}
                                           for record in fresh])
    assert cli.main(["score", "--checkpoint", str(workdir), "--input", str(tmp_path / "fresh.jsonl"),
                     "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line)["score"] for line in open(tmp_path / "scored.jsonl")]
    np.testing.assert_allclose(scored, chosen, atol=1e-6)


def test_score_command_prints_its_phase_and_sums_the_scores_up_at_the_end(tmp_path, monkeypatch, capsys):
    scores = {"A.": 0.9, "B.": 0.2, "C.": 0.3, "D.": 0.4, "E.": 0.5}
    monkeypatch.setattr("llama2_jax.checkpoint.load.load_with_tokenizer", lambda *args, **keywords: (None, None))
    monkeypatch.setattr("llama2_jax.reward.score", lambda model, tokenizer, prompts, responses, **keywords:
                        np.array([scores[response] for response in responses]))
    write_pairs(tmp_path / "in.jsonl", [{"prompt": "Which?", "chosen": "A.", "rejected": "B."},
                                        {"prompt": "Which?", "chosen": "C.", "rejected": "D."},
                                        {"prompt": "Who?", "response": "E."}])
    assert cli.main(["score", "--checkpoint", "rm", "--input", str(tmp_path / "in.jsonl"),
                     "--out", str(tmp_path / "out.jsonl")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "scoring 5 responses with rm", f"wrote 5 scores to {tmp_path / 'out.jsonl'}",
        "2 pairs: chosen scored above rejected in 1 (accuracy 0.500); mean score 0.600 chosen, 0.300 rejected; "
        "1 response: mean score 0.500"]
    assert [json.loads(line).get("chosen_score") for line in open(tmp_path / "out.jsonl")] == [0.9, 0.3, None]


class Configured(Exception):
    """Raised instead of training, with the steps the stage would train for."""


def test_steps_are_epochs_of_the_pairs_of_the_dataset_and_of_its_mixture(pretrained, tmp_path, monkeypatch):
    identical = {"prompt": "Which?", "chosen": "To be.", "rejected": "To be.", "rating": "better"}  # skipped
    data = write_pairs(tmp_path / "pairs.jsonl", preference_records(27) + [identical] * 3)
    # other_pairs is unrated, as the open-source datasets are: its pairs train too (margin 0).
    unrated = [{key: value for key, value in record.items() if key != "rating"}
               for record in preference_records(15, seed=1)]
    other = write_pairs(tmp_path / "other.jsonl", unrated + [identical] * 5)
    sources.build_local_dataset("other_pairs", [other], format="preferences", data_dir=tmp_path / "tfds")

    def train(config, workdir, task):
        raise Configured(config.train.steps)

    monkeypatch.setattr("llama2_jax.stages.reward.train", train)
    with pytest.raises(Configured) as configured:
        cli.main(reward_argv(pretrained, tmp_path / "reward", data, tmp_path, "--config.data.holdout_fraction=0",
                             "--config.train.eval_every=0", "--config.train.global_batch_size=8",
                             "--config.train.epochs=2", "--config.reward.mix=(('other_pairs', 0.25),)"))
    # An epoch is one pass over the 30 pairs of data.dataset, 27 of them usable, while a quarter of all
    # pairs drawn, 10, come from other_pairs, three quarters of them usable: 34.5 pairs. Two epochs in
    # batches of 8 take 9 steps (counting the skipped pairs, 10; leaving out the mixture, 7).
    assert configured.value.args == (9,)


def test_histograms_are_written_as_lists(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    histogram = [0.25, 0.0, 0.75]
    writer.write(3, {"accuracy": np.float32(0.5), "chosen_score_histogram": np.array(histogram)}, prefix="eval_")
    writer.close()
    assert read_metrics(str(tmp_path)) == [{"step": 3, "eval_accuracy": 0.5, "eval_chosen_score_histogram": histogram}]
    (events,) = (tmp_path / "tensorboard").iterdir()
    histograms = [value.histo for event in tensorboard_events(events) for value in event.summary.value
                  if value.tag == "eval_chosen_score_histogram"]
    assert [(list(h.bucket), list(h.bucket_limit), h.min, h.max) for h in histograms] == [
        (histogram, [1 / 3, 2 / 3, 1.0], 0.0, 1.0)]


def tensorboard_events(path):
    """The events of a TensorBoard file: records of a length, its CRC, the data and the data's CRC."""
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 16 + length
    return events


@pytest.mark.slow
def test_the_demo_reward_models_tell_the_bundled_pairs_apart(tmp_path):
    """The README's commands end to end: pretrain, fine-tune, then the two reward models (about half
    an hour on two CPU cores). Held-out accuracy rises with the rating level, as in the paper."""
    runs = tmp_path / "runs"
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={runs / 'tiny'}"]) == 0
    assert cli.main(["sft", "--config=configs/sft.py:tiny", f"--config.init_checkpoint={runs / 'tiny'}",
                     f"--workdir={runs / 'sft'}"]) == 0
    last = {}
    for model, config in (("helpfulness", "tiny"), ("safety", "tiny,safety")):
        workdir = runs / f"reward_{model}"
        assert cli.main(["reward", f"--config=configs/reward.py:{config}", f"--config.init_checkpoint={runs / 'sft'}",
                         f"--workdir={workdir}"]) == 0
        last[model] = [record for record in read_metrics(workdir) if "eval_accuracy" in record][-1]
    helpfulness, safety = last["helpfulness"], last["safety"]
    by_level = [helpfulness[f"eval_accuracy_{level}"] for level in
                ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")]
    assert helpfulness["eval_accuracy"] > 0.7 and by_level == sorted(by_level, reverse=True)
    assert by_level[0] - by_level[-1] > 0.2
    assert safety["eval_accuracy"] > 0.9 and safety["eval_unsafe_recall"] > 0.8
