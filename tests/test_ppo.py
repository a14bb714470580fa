"""PPO: the reward, KL and advantage arithmetic against hand computations, the clipped losses, the
rollouts of the current policy, a stopped run that resumes to the step, and bad input."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli, sharding
from llama2_jax.checkpoint.convert import export_model
from llama2_jax.checkpoint import load
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.prompts import Prompt
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import ActorCritic, Llama, LlamaRewardModel
from llama2_jax.reward import combine, score_tokens
from llama2_jax.rollout.iterations import RolloutBatches, Settings
from llama2_jax.rollout.prompts import PromptSet
from llama2_jax.rollout.sampler import Answer
from llama2_jax.rollout.scoring import FrozenModels
from llama2_jax.stages import on_policy, ppo
from llama2_jax.train import loop, optim, ppo_loss
from stop_requests import stop_when
from tolerances import assert_close_at_scale

TOKENIZER = Tokenizer()
LINES = ["O, I am slain!", "Out, damned spot!", "Is this a dagger which I see before me,", "Alas, poor Yorick!",
         "To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen",
         "All the world's a stage", "Once more unto the breach, dear friends", "If music be the food of love",
         "Double, double toil and trouble", "What's in a name?"]


def test_reward_kl_and_gae_match_a_hand_computation():
    helpfulness, safety = np.array([0.8, 0.6, 0.9]), np.array([0.5, 0.1, 0.7])
    is_safety = np.array([False, False, True])
    combined = combine(helpfulness, safety, is_safety)
    assert combined.tolist() == pytest.approx([0.8, 0.1, 0.7])
    logits = [math.log(p / (1 - p)) for p in (0.8, 0.1, 0.7)]
    assert ppo_loss.logit(combined) == pytest.approx(logits, abs=1e-5)
    mean = sum(logits) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / 3)
    whitened = ppo_loss.whiten(ppo_loss.logit(combined))
    assert whitened == pytest.approx([(x - mean) / std for x in logits], abs=1e-5)

    # Row 0 answers at entries 1..3, row 1 at 2..3, row 2 at 0..1.
    mask = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]], np.float32)
    log_probs = np.array([[0, -1.0, -2.0, -0.5], [0, 0, -1.5, -0.2], [-0.3, -0.7, 0, 0]], np.float32)
    reference = np.array([[0, -1.2, -1.0, -0.5], [0, 0, -1.0, -0.4], [-0.3, -0.9, 0, 0]], np.float32)
    k1, k3 = ppo_loss.kl_estimates(log_probs, reference)
    assert k1[0, 1:].tolist() == pytest.approx([0.2, -1.0, 0.0], abs=1e-6)
    assert k3[0, 2] == pytest.approx(math.exp(1.0) - 1 - 1.0, abs=1e-5)
    beta = 0.1
    rewards = ppo_loss.token_rewards(whitened, k1 * mask, mask, beta)
    assert rewards[0].tolist() == pytest.approx([0, -0.02, 0.1, whitened[0]], abs=1e-6)
    assert rewards[1].tolist() == pytest.approx([0, 0, 0.05, -0.02 + whitened[1]], abs=1e-6)
    assert rewards[2].tolist() == pytest.approx([0, -0.02 + whitened[2], 0, 0], abs=1e-6)

    values = np.array([[9.0, 0.5, 0.4, 0.3], [9.0, 9.0, -0.2, 0.1], [0.6, 0.2, 9.0, 9.0]], np.float32)
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo_loss.gae(rewards, values, mask, gamma, lam)
    for row, (first, last) in enumerate([(1, 3), (2, 3), (0, 1)]):
        expected, following = {}, 0.0
        for t in range(last, first - 1, -1):
            next_value = values[row, t + 1] if t < last else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            following = delta + gamma * lam * following
            expected[t] = following
        for t in range(4):
            assert advantages[row, t] == pytest.approx(expected.get(t, 0.0), abs=1e-5)
            assert returns[row, t] == pytest.approx(expected[t] + values[row, t] if t in expected else 0.0, abs=1e-5)
    whitened_advantages = ppo_loss.whiten(advantages, mask)
    chosen = advantages[mask > 0]
    assert whitened_advantages[mask > 0] == pytest.approx((chosen - chosen.mean()) / chosen.std(), abs=1e-4)
    assert np.all(whitened_advantages[mask == 0] == 0)


def test_both_kl_estimators_are_exact_in_expectation():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * np.log(p / q)))
    k1, k3 = ppo_loss.kl_estimates(np.log(p), np.log(q))  # one entry per token of the vocabulary
    assert float(np.sum(p * k1)) == pytest.approx(exact, rel=1e-5)
    assert float(np.sum(p * k3)) == pytest.approx(exact, rel=1e-5)
    assert np.all(k3 >= 0)


CONFIG = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2, vocab_size=64, dim=32, n_heads=2,
                                 n_kv_heads=2, max_seq_len=16)


def fixed_batch(model, seed=0):
    """Training rows of random tokens: answers at entries 5..10, old log-probs those of `model`."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    mask = np.zeros((4, 12), np.float32)
    mask[:, 5:11] = 1
    logits = model.policy(jnp.asarray(inputs))
    log_probs = np.asarray(jax.nn.log_softmax(logits)[np.arange(4)[:, None], np.arange(11)[None], inputs[:, 1:]])
    targets = np.concatenate([inputs[:, 1:], np.zeros((4, 1), np.int32)], axis=1)
    old = np.concatenate([log_probs, np.zeros((4, 1), np.float32)], axis=1) * mask
    values = np.asarray(model.value.token_scores(jnp.asarray(inputs))) * mask
    return {"inputs": inputs, "targets": targets, "positions": np.broadcast_to(np.arange(12), (4, 12)).astype(np.int32),
            "segment_ids": np.ones((4, 12), np.int32), "answer_mask": mask, "old_log_probs": old,
            "old_values": values, "advantages": rng.normal(size=(4, 12)).astype(np.float32) * mask,
            "returns": (values + rng.normal(size=(4, 12))).astype(np.float32) * mask}


def test_the_clipped_objective_at_ratio_one_is_the_policy_gradient():
    model = ActorCritic(CONFIG, rngs=nnx.Rngs(0))
    batch = fixed_batch(model)
    loss_fn = ppo_loss.make_ppo_loss(clip=0.2, value_clip=0.2)
    graphdef, params = nnx.split(model, nnx.Param)

    def ppo(params):
        return loss_fn(nnx.merge(graphdef, params), batch)

    def policy_gradient(params):  # -sum A log pi
        logits = nnx.merge(graphdef, params).policy(jnp.asarray(batch["inputs"]))
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
        return -jnp.sum(batch["answer_mask"] * batch["advantages"] * log_probs)

    (loss, sums), grads = jax.jit(jax.value_and_grad(ppo, has_aux=True))(params)
    expected = jax.jit(jax.grad(policy_gradient))(params)
    assert float(sums["ratio"] / sums["weight"]) == pytest.approx(1.0, abs=1e-5)
    assert float(sums["clip_fraction"]) == 0 and float(sums["approx_kl"]) == pytest.approx(0, abs=1e-9)
    for got, want in zip(jax.tree.leaves(grads["policy"]), jax.tree.leaves(expected["policy"])):
        assert_close_at_scale(got, want, rtol=1e-4)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["value"]))


def test_one_ppo_step_on_a_fixed_batch_lowers_its_loss_and_each_model_has_its_own_learning_rate():
    model = ActorCritic(CONFIG, rngs=nnx.Rngs(1))
    batch = fixed_batch(model, seed=1)
    loss_fn = ppo_loss.make_ppo_loss(clip=0.2, value_clip=0.2)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    settings = dict(optim.PAPER_OPTIMIZER, peak_lr=1e-3, warmup_steps=0, end_lr_fraction=1.0)
    optimizer, _ = optim.make_optimizer(settings, 10, {"policy": 1e-3, "value": 0.0})

    def loss(params):
        total, _ = loss_fn(nnx.merge(graphdef, params), batch)
        return total

    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    stepped = jax.tree.map(jnp.add, params, updates)
    assert float(jax.jit(loss)(stepped)) < float(before) - 1e-3
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["value"]))  # value lr 0
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["policy"]))


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    """A random policy and reward models with the bundled tokenizer, and a small set of prompts."""
    root = tmp_path_factory.mktemp("ppo_models")
    for name in ("policy", "helpfulness", "safety"):
        (root / name).symlink_to(random_models / name)  # the session's random models
    records = [{"messages": [{"role": "user", "content": f"Continue this speech:\n{line}"}], "safety": index % 3 == 0}
               for index, line in enumerate(LINES)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def argv(models, workdir, *extra):
    return ["ppo", "--config=configs/ppo.py:tiny", f"--workdir={workdir}",
            f"--config.init_checkpoint={models / 'policy'}", "--config.model.n_layers=2",
            f"--config.ppo.helpfulness_rm={models / 'helpfulness'}", f"--config.ppo.safety_rm={models / 'safety'}",
            "--config.data.dataset=ppo_test_prompts", f"--config.data.paths=('{models / 'prompts.jsonl'}',)",
            "--config.data.format=prompts", "--config.data.holdout_fraction=0.3",
            f"--config.data.data_dir={models / 'tfds'}", "--config.ppo.iterations=2", "--config.ppo.rollouts=16",
            "--config.train.global_batch_size=8", "--config.ppo.max_new_tokens=6", "--config.ppo.batch_size=16",
            "--config.ppo.eval_prompts=2", "--config.train.eval_every=2", "--config.train.seq_len=64",
            "--config.train.checkpoint_every=1", "--config.optimizer.peak_lr=1e-3", *extra]


def logged(workdir):
    return [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo_run")
    assert cli.main(argv(models, workdir)) == 0
    return workdir


def test_a_run_trains_on_its_own_rollouts_and_leaves_the_policy_in_its_workdir(uninterrupted, models):
    records = logged(uninterrupted)
    steps = [record for record in records if "policy_loss" in record]
    assert [record["step"] for record in steps] == [2, 4]  # one line per iteration of 16 / 8 mini-batches
    first = steps[0]
    # The old log-probs come from the training forward pass: the first mini-batch's ratio is 1. Its
    # log line averages the iteration's two mini-batches, so only the second moves it.
    assert first["kl_reference"] == pytest.approx(0.0, abs=1e-5)  # the policy is still the reference
    for name in ("reward_combined", "reward_helpfulness", "reward_safety", "safety_share", "entropy",
                 "eos_rate", "answer_length", "rollout_s", "scoring_s", "rollout_tokens_per_s", "clip_fraction",
                 "approx_kl", "value_loss"):
        assert name in first
    assert steps[1]["kl_reference"] > 0  # the policy moved
    evaluations = [record for record in records if "eval_reward_combined" in record]
    assert [record["step"] for record in evaluations] == [0, 2, 4]
    assert evaluations[0]["eval_kl_reference"] == pytest.approx(0.0, abs=1e-5)
    assert len((uninterrupted / "held_out" / "step_4.jsonl").read_text().splitlines()) == 2
    assert (uninterrupted / "train" / "ppo.png").is_file()
    policy = load_pretrained(uninterrupted, "float32")
    assert isinstance(policy, Llama)
    trained = load_pretrained(models / "policy", "float32")
    assert not np.allclose(policy.output.kernel[...], trained.output.kernel[...])


def test_the_rollouts_old_log_probs_make_the_first_ratio_one():
    """A PPO rollout's old log-probs and values come from the training forward pass: the loss on its
    rows sees ratio 1 and values unclipped, to float precision."""
    model = ActorCritic(CONFIG, rngs=nnx.Rngs(2))
    frozen = FrozenModels(Llama(CONFIG, rngs=nnx.Rngs(3)), LlamaRewardModel(CONFIG, rngs=nnx.Rngs(4)),
                          LlamaRewardModel(CONFIG, rngs=nnx.Rngs(5)))
    rng = np.random.default_rng(0)
    is_safety = [True, False, False, True]
    prompts = PromptSet([Prompt(({"role": "user", "content": "x"},), safety) for safety in is_safety], [0, 1, 2, 3],
                        [rng.integers(3, 64, length).tolist() for length in (3, 5, 4, 6)], 0)
    answers = [Answer(row, 0, tuple(rng.integers(3, 64, length).tolist()), finished)
               for row, (length, finished) in enumerate([(4, True), (2, False), (5, True), (3, True)])]
    settings = Settings(rollouts=4, mini_batch=4, epochs=1, max_new_tokens=6, temperature=1.0, slots=4,
                        score_batch_size=4, seq_len=16, seed=0, eos_id=2)
    section = ml_collections.ConfigDict(dict(kl_coef=0.1, gamma=1.0, lam=0.95, missing_eos_penalty=1.0))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rows, metrics = on_policy.score_rollout(ppo.ALGORITHM, section, model, frozen,
                                            on_policy.Rewards(section, "ppo", None), prompts, answers, np.arange(4),
                                            settings, mesh, sharding.DEFAULT_RULES)
    assert rows["answer_mask"].sum(axis=1).tolist() == [4, 2, 5, 3]
    assert rows["answer_mask"][1].tolist()[4:7] == [1, 1, 0]  # prompt of 5: answer tokens at 5, 6
    _, sums = ppo_loss.make_ppo_loss(clip=0.2, value_clip=0.2)(model, rows)
    assert float(sums["ratio"] / sums["weight"]) == pytest.approx(1.0, abs=1e-5)
    assert float(sums["approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(sums["clip_fraction"]) == 0 and float(sums["value_clip_fraction"]) == 0
    off_answers = rows["answer_mask"] == 0
    assert np.all(rows["old_log_probs"][off_answers] == 0) and np.all(rows["advantages"][off_answers] == 0)
    sequences = [[*prompts.tokens[a.prompt], *a.tokens, *(() if a.finished else (2,))] for a in answers]
    helpfulness, safety = (score_tokens(rm, sequences, batch_size=4, mesh=mesh, rules=sharding.DEFAULT_RULES)
                           for rm in (frozen.helpfulness, frozen.safety))
    assert metrics["reward_combined"] == pytest.approx(float(combine(helpfulness, safety, is_safety).mean()), abs=1e-6)
    assert metrics["kl_reference"] != 0  # the policy is not its reference


def test_a_run_stopped_mid_iteration_resumes_to_the_same_rewards_and_losses(models, uninterrupted, tmp_path,
                                                                            monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(loop, "StopRequests", stop_when(lambda step: step == 3))  # inside iteration 2
        assert cli.main(argv(models, tmp_path)) == 75
    assert cli.main(argv(models, tmp_path)) == 0
    expected = [record for record in logged(uninterrupted) if record["step"] in (2, 4)]
    resumed = [record for record in logged(tmp_path) if record["step"] in (2, 4)]
    assert len(resumed) == len(expected) == 4
    for got, want in zip(resumed, expected):
        for name in ("reward_combined", "kl_reference", "loss", "policy_loss", "value_loss", "eval_reward_combined",
                     "eval_kl_reference"):
            if name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    final = load_pretrained(tmp_path, "float32").output.kernel[...]
    np.testing.assert_allclose(final, load_pretrained(uninterrupted, "float32").output.kernel[...], atol=1e-6)


def test_bad_input_is_one_clear_error(models, tmp_path, capsys):
    cases = [
        (["--config.ppo.rollouts=12"], 2, "ppo.rollouts 12 is not a multiple of the mini-batch"),
        (["--config.ppo.value_init=nowhere"], 2, "ppo.value_init"),
        ([f"--config.ppo.helpfulness_rm={models / 'policy'}"], 1, "holds a language model; it must be a reward model"),
        (["--config.ppo.device_memory_gib=0.001"], 1, "shard them over more devices"),
        (["--config.lora.rank=4", "--config.lora.dropout=0.1"], 2, "PPO trains adapters without dropout"),
    ]
    for extra, code, message in cases:
        assert cli.main(argv(models, tmp_path / "bad", *extra)) == code
        assert message in capsys.readouterr().err
    other = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2, vocab_size=1024)
    export_model(LlamaRewardModel(other, rngs=nnx.Rngs(3)), str(tmp_path / "other_rm"), "orbax",
                 tokenizer_path=str(TOKENIZER.path))
    assert cli.main(argv(models, tmp_path / "bad", f"--config.ppo.safety_rm={tmp_path / 'other_rm'}")) == 1
    assert "vocabulary of 1024 tokens" in capsys.readouterr().err
    smaller = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=1)
    export_model(LlamaRewardModel(smaller, rngs=nnx.Rngs(4)), str(tmp_path / "small_rm"), "orbax",
                 tokenizer_path=str(TOKENIZER.path))
    assert cli.main(argv(models, tmp_path / "bad", f"--config.ppo.helpfulness_rm={tmp_path / 'small_rm'}")) == 1
    assert "value_init=policy" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "train" / "checkpoints").exists()


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(models, tmp_path, monkeypatch, capsys):
    real, made = RolloutBatches.next_batch, []

    def nan_from_the_second_batch(self, model):
        batch, metrics = real(self, model)
        made.append(batch)
        return (dict(batch, advantages=batch["advantages"] * jnp.nan) if len(made) > 1 else batch), metrics

    monkeypatch.setattr(RolloutBatches, "next_batch", nan_from_the_second_batch)
    assert cli.main(argv(models, tmp_path)) == 1
    assert "the loss is nan at step 2" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_the_value_model_can_start_from_the_policy(models, tmp_path):
    assert cli.main(argv(models, tmp_path, "--config.ppo.value_init=policy", "--config.ppo.iterations=1",
                         "--config.ppo.eval_prompts=0")) == 0


def test_early_stopping_on_held_out_kl_and_on_a_reward_that_stopped_rising():
    from ml_collections import ConfigDict

    from llama2_jax.stages.on_policy import early_stop_rule

    assert early_stop_rule("ppo", ConfigDict(dict(early_stop_kl=0.0, patience=0))) is None
    by_kl = early_stop_rule("ppo", ConfigDict(dict(early_stop_kl=2.0, patience=0)))
    assert by_kl({"kl_reference": 1.9, "reward_combined": 0.1}) is None
    assert "ppo.early_stop_kl" in by_kl({"kl_reference": 2.1, "reward_combined": 0.9})
    by_reward = early_stop_rule("ppo", ConfigDict(dict(early_stop_kl=0.0, patience=2)))
    verdicts = [by_reward({"kl_reference": 0.0, "reward_combined": value}) for value in (0.5, 0.6, 0.55, 0.7, 0.6, 0.6)]
    assert verdicts[:5] == [None] * 5 and "ppo.patience" in verdicts[5]


def test_with_adapters_the_value_models_base_under_the_rms_head_is_the_helpfulness_rm(models, uninterrupted,
                                                                                     tmp_path):
    # At step 0 the policy with fresh adapters is its base, so it answers the held-out prompts as the
    # run without adapters did; the helpfulness RM built from the value model's base and the RM's
    # head (not loaded a second time) scores them as the loaded RM did.
    assert cli.main(argv(models, tmp_path, "--config.lora.rank=4", "--config.ppo.iterations=1")) == 0
    def held_out_at_step_0(workdir):
        return [json.loads(line) for line in (workdir / "held_out" / "step_0.jsonl").read_text().splitlines()]

    adapted, alone = held_out_at_step_0(tmp_path), held_out_at_step_0(uninterrupted)
    assert [record["answer"] for record in adapted] == [record["answer"] for record in alone]
    for name in ("helpfulness", "safety", "combined"):
        np.testing.assert_allclose([record[name] for record in adapted], [record[name] for record in alone],
                                   atol=1e-5, rtol=0, err_msg=name)
    # Adapters moved the policy: the held-out answers' log pi - log pi_ref is no longer 0 (an estimate
    # of the KL on answers sampled at temperature 0.6, top-p 0.9, so of either sign).
    assert any(abs(record.get("eval_kl_reference", 0)) > 1e-4 for record in logged(tmp_path))


def test_the_shared_helpfulness_rm_keeps_its_own_head_while_the_value_head_trains():
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2)
    rm = LlamaRewardModel(config, rngs=nnx.Rngs(1))
    value = load.with_new_parameters(rm, config.replace(lora_rank=4), LlamaRewardModel, sharding.make_mesh(),
                                     sharding.DEFAULT_RULES, seed=0)
    for path, variable in nnx.to_flat_state(nnx.state(value, nnx.LoRAParam)):  # as if trained
        variable.set_value(variable[...] + 0.1)
    value.score.kernel.set_value(value.score.kernel[...] * 3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 12)), jnp.int32)
    frozen = FrozenModels(None, None, None, helpfulness_head=rm.score.kernel[...])
    scorer = frozen.scoring_with(value).helpfulness
    np.testing.assert_allclose(scorer(tokens), rm(tokens), atol=1e-5, rtol=0)
    assert float(jnp.abs(value(tokens) - rm(tokens)).max()) > 1e-2  # the value model itself is untouched
    assert float(jnp.abs(value.score.kernel[...] - rm.score.kernel[...] * 3).max()) == 0
    # One reward model fewer on each device.
    mesh = sharding.make_mesh()
    shared, apart = (ppo.memory_per_device(config.replace(lora_rank=4), "float32", mesh, sharding.DEFAULT_RULES,
                                           value_shares_helpfulness_base=share) for share in (True, False))
    assert shared["frozen"] == pytest.approx(apart["frozen"] / 2)
