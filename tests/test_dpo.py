"""DPO: the loss against a hand computation (with and without the rating margin, and IPO), the answer
masks of the pair rows, the implicit-reward accuracy per level, a stopped run that resumes exactly,
and bad input."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.checkpoint.convert import export_model
from llama2_jax.data.preferences import PreferencePairs
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.train import dpo_loss, loop
from stop_requests import stop_when

TOKENIZER = Tokenizer()
CONFIG = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2, vocab_size=64, dim=32, n_heads=2,
                                 n_kv_heads=2, max_seq_len=16)
MARGINS = {"none": [0, 0, 0, 0], "small": [1, 2 / 3, 1 / 3, 0]}


def sequence_log_prob(model, tokens, answer_from):
    """log pi of tokens[answer_from:] given what precedes them, by one forward pass and a loop."""
    log_probs = jax.nn.log_softmax(model(jnp.asarray([tokens]))[0])
    return sum(float(log_probs[t - 1, tokens[t]]) for t in range(answer_from, len(tokens)))


def pair_rows(pairs, ratings, reference, length=12):
    """Rows of pairs `((chosen tokens, answer start), (rejected tokens, answer start))`."""
    batch = {name: np.zeros((len(pairs), 2, length), np.int32) for name in ("inputs", "positions", "segment_ids")}
    batch["answer_mask"] = np.zeros((len(pairs), 2, length), np.float32)
    for row, pair in enumerate(pairs):
        for side, (tokens, start) in enumerate(pair):
            batch["inputs"][row, side, :len(tokens)] = tokens
            batch["positions"][row, side, :len(tokens)] = np.arange(len(tokens))
            batch["segment_ids"][row, side, :len(tokens)] = 1
            batch["answer_mask"][row, side, start - 1:len(tokens) - 1] = 1
    batch.update(rating=np.asarray(ratings, np.int32), chosen_safe=np.ones(len(pairs), np.int32),
                 rejected_safe=np.ones(len(pairs), np.int32), pair_weight=np.ones(len(pairs), np.float32),
                 reference_chosen=np.asarray([c for c, _ in reference], np.float32),
                 reference_rejected=np.asarray([r for _, r in reference], np.float32))
    return {name: jnp.asarray(value) for name, value in batch.items()}


@pytest.mark.parametrize("loss, margin", [("sigmoid", "none"), ("sigmoid", "small"), ("ipo", "none")])
def test_the_loss_is_dpo_computed_by_hand(loss, margin):
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    pairs = [tuple((rng.integers(3, 64, length).tolist(), start) for length, start in sides)
             for sides in (((9, 4), (7, 4)), ((12, 5), (10, 6)), ((6, 2), (8, 3)))]
    reference = [(-20.0, -18.5), (-31.0, -29.0), (-15.0, -17.0)]
    ratings, beta = [0, 2, -1], 0.3
    total, sums = dpo_loss.make_dpo_loss(beta=beta, loss=loss, margin=margin)(
        model, pair_rows(pairs, ratings, reference))
    expected, correct = 0.0, 0
    for ((chosen, c_start), (rejected, r_start)), rating, (ref_c, ref_r) in zip(pairs, ratings, reference):
        chosen_reward = beta * (sequence_log_prob(model, chosen, c_start) - ref_c)
        rejected_reward = beta * (sequence_log_prob(model, rejected, r_start) - ref_r)
        h = chosen_reward - rejected_reward
        m = MARGINS[margin][rating] if rating >= 0 else 0.0  # unrated: 0
        expected += math.log1p(math.exp(-(h - m))) if loss == "sigmoid" else (h / beta - 1 / (2 * beta)) ** 2
        correct += chosen_reward > rejected_reward
    assert float(sums["weight"]) == 3
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(sums["accuracy"]) == correct


def test_a_pair_of_one_answer_has_no_gradient_and_the_start_costs_log_2():
    """Policy equal to the reference: h = 0 and the loss is log 2 per pair; a pair whose chosen equals
    its rejected gives h = 0 whatever the policy, so it moves nothing."""
    model = Llama(CONFIG, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    same = rng.integers(3, 64, 9).tolist()
    different = (rng.integers(3, 64, 10).tolist(), rng.integers(3, 64, 8).tolist())
    own = [sequence_log_prob(model, tokens, 4) for tokens in (same, *different)]
    loss_fn = dpo_loss.make_dpo_loss(beta=0.1, loss="sigmoid", margin="none")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)[0]

    def largest_gradient(batch):
        return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params, batch)))

    identical = pair_rows([((same, 4), (same, 4))], [0], [(own[0], own[0])])
    np.testing.assert_allclose(float(loss(params, identical)), math.log(2), rtol=1e-6)
    at_reference = pair_rows([((different[0], 4), (different[1], 4))], [0], [(own[1], own[2])])
    np.testing.assert_allclose(float(loss(params, at_reference)), math.log(2), rtol=1e-5)
    # The two rows of the identical pair cancel to rounding (1e-9 here), a real pair's gradient is ~1e-2.
    assert largest_gradient(identical) < 1e-6 < 1e-3 < largest_gradient(at_reference)


def test_implicit_reward_accuracy_is_counted_per_rating_level():
    model = Llama(CONFIG, rngs=nnx.Rngs(2))
    tokens = [5, 9, 11, 3, 7, 8]
    own = sequence_log_prob(model, tokens, 3)
    # Same answers on both sides: the implicit rewards differ only by the reference's log-probs.
    references = [(own + 1, own), (own - 1, own), (own - 1, own), (own + 1, own)]  # wrong, right, right, wrong
    _, sums = dpo_loss.make_dpo_loss(beta=1.0)(model, pair_rows([((tokens, 3), (tokens, 3))] * 4, [0, 0, 1, 3],
                                                                 references))
    assert float(sums["accuracy_significantly_better"]) == 1 and float(sums["accuracy_significantly_better_weight"]) == 2
    assert float(sums["accuracy_better"]) == 1 and float(sums["accuracy_negligibly_better_or_unsure"]) == 0


def test_pair_rows_mask_the_final_answer_only():
    encoder = PreferencePairs(TOKENIZER, 64, safety_rule=True, answer_masks=True)
    prompt = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "HAMLET."},
              {"role": "user", "content": "And then?"}]
    (row,), _ = encoder.encode({"prompt": prompt, "chosen": "GHOST.", "rejected": "Nobody at all.", "rating": 0,
                                "chosen_safe": 1, "rejected_safe": 1})
    for side, answer in enumerate(("GHOST.", "Nobody at all.")):
        tokens = row["inputs"][side][row["segment_ids"][side] > 0].tolist()
        marked = np.flatnonzero(row["answer_mask"][side])
        predicted = [tokens[t + 1] for t in marked]  # what the marked predictions are of
        assert marked.tolist() == list(range(marked[0], len(tokens) - 1))  # one run, up to the EOS
        assert TOKENIZER.decode(predicted[:-1]).strip() == answer and predicted[-1] == TOKENIZER.eos_id
        assert "HAMLET" not in TOKENIZER.decode(predicted)  # the earlier answer is not trained


def write_pairs(path, count, seed=0, identical=0):
    rng = np.random.default_rng(seed)
    words = ["night", "day", "sword", "crown", "ghost", "king", "stage", "storm", "rose", "grave"]
    records = []
    for index in range(count):
        body = " ".join(rng.choice(words, 3))
        records.append({"prompt": f"Continue: {body}", "chosen": f"{body}, good night.",
                        "rejected": f"{body}, be gone.", "rating": ["better", "slightly_better"][index % 2]})
    records += [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes.", "rating": "better"}] * identical
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def argv(init, workdir, data, tmp_path, *extra):
    return ["dpo", "--config=configs/dpo.py:tiny", f"--config.init_checkpoint={init}", f"--workdir={workdir}",
            "--config.data.dataset=dpo_pairs", f"--config.data.paths=('{data}',)", "--config.data.format=preferences",
            "--config.data.holdout_fraction=0.2", f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.dpo.mix=()",
            "--config.train.seq_len=64", "--config.train.global_batch_size=8", "--config.train.steps=4",
            "--config.train.eval_every=2", "--config.train.log_every=1", "--config.train.checkpoint_every=1",
            "--config.optimizer.peak_lr=1e-3", *extra]


def test_a_run_learns_the_pairs_and_a_stopped_run_resumes_exactly(pretrained, tmp_path, monkeypatch, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 60, identical=5)
    assert cli.main(argv(pretrained, tmp_path / "whole", data, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "5 chosen and rejected are the same text" in out  # skipped and counted
    assert "held-out implicit-reward accuracy after step 4" in out
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in whole if "eval_loss" in record]
    # At the start the policy is the reference: h = 0, and each pair costs log(1 + e^m), m = 2/3 or 1/3.
    assert evaluations[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert math.log1p(math.exp(1 / 3)) <= evaluations[0]["eval_loss"] <= math.log1p(math.exp(2 / 3))
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    with monkeypatch.context() as patch:
        patch.setattr(loop, "StopRequests", stop_when(lambda step: step == 2))
        assert cli.main(argv(pretrained, tmp_path / "stopped", data, tmp_path)) == 75
    assert cli.main(argv(pretrained, tmp_path / "stopped", data, tmp_path)) == 0
    resumed = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(resumed, whole, strict=True):
        assert got["step"] == want["step"]
        for name in ("loss", "eval_loss", "accuracy", "eval_accuracy", "chosen_log_prob", "eval_reward_margin"):
            if name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


def test_bad_input_is_one_clear_error(pretrained, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    assert cli.main(argv(pretrained, tmp_path / "run", data, tmp_path, "--config.dpo.loss=ipo")) == 2
    assert "set dpo.margin=none with dpo.loss=ipo" in capsys.readouterr().err
    other = tmp_path / "other"
    export_model(Llama(LlamaConfig.from_preset("tiny", compute_dtype="float32", vocab_size=256), rngs=nnx.Rngs(0)),
                 str(other), "orbax", tokenizer_path=str(TOKENIZER.path))
    assert cli.main(argv(pretrained, tmp_path / "run", data, tmp_path, f"--config.dpo.reference={other}")) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: dpo.reference") and "vocabulary of 256 tokens" in error
    assert not (tmp_path / "run").exists()
