"""GRPO: group-relative advantages and the clipped loss with its k3 term against hand computations, the
program reward and the bundled instruction-following one, rewards from the reward models, a stopped
run that resumes to the step, and bad input."""

import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from llama2_jax import cli, sharding
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.instructions import InstructionSet, follows_instruction, load_characters_and_plays
from llama2_jax.data.prompts import Prompt
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, LlamaRewardModel
from llama2_jax.reward import combine, score_tokens
from llama2_jax.rollout.prompts import PromptSet
from llama2_jax.rollout.sampler import Answer
from llama2_jax.rollout.scoring import FrozenModels
from llama2_jax.stages import grpo, on_policy
from llama2_jax.train import grpo_loss, loop, ppo_loss
from stop_requests import stop_when
from tolerances import standardised_tolerance

TOKENIZER = Tokenizer()
LINES = ["O, I am slain!", "Out, damned spot!", "Is this a dagger which I see before me,", "Alas, poor Yorick!",
         "To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen",
         "All the world's a stage", "Once more unto the breach, dear friends", "If music be the food of love",
         "Double, double toil and trouble", "What's in a name?"]
CALLS = []  # (messages, answer) of every call of `recording_reward`


def recording_reward(messages, answer):
    """A program reward for the runs: it records its arguments and rewards an answer's length mod 3."""
    CALLS.append((messages, answer))
    return float(len(answer) % 3)


def not_a_number(messages, answer):
    return "high"


def test_group_advantages_match_a_hand_computation():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 3.0, 5.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    centred = [0.5, -0.5, 0.0, 0.0, -1.0, -1.0, 0.0, 2.0]  # means 0.5 and 3
    stds = [math.sqrt((0.25 + 0.25) / 4)] * 4 + [math.sqrt((1 + 1 + 0 + 4) / 4)] * 4
    scaled = grpo_loss.group_advantages(rewards, groups, scale=True)
    assert scaled == pytest.approx([c / (s + 1e-6) for c, s in zip(centred, stds)], abs=1e-6)
    assert grpo_loss.group_advantages(rewards, groups, scale=False) == pytest.approx(centred, abs=1e-6)
    # A group whose answers scored alike teaches nothing: advantage 0, not a division by 0.
    assert grpo_loss.group_advantages([0.7, 0.7, 0.1, 0.3], [3, 3, 5, 5]).tolist()[:2] == [0.0, 0.0]


CONFIG = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2, vocab_size=64, dim=32, n_heads=2,
                                 n_kv_heads=2, max_seq_len=16)


def test_the_loss_matches_a_hand_computation_with_its_k3_term():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, CONFIG.vocab_size, (3, 10)).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((3, 1), np.int32)], axis=1)
    mask = np.zeros((3, 10), np.float32)
    mask[:, 4:9] = 1
    mask[2, 7:] = 0  # a shorter answer
    log_probs = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(model(jnp.asarray(inputs))),
                                               targets[..., None], axis=-1)[..., 0])
    old = (log_probs + rng.uniform(-0.4, 0.4, (3, 10))).astype(np.float32) * mask  # ratios in and out of the clip
    reference = (log_probs + rng.uniform(-0.5, 0.5, (3, 10))).astype(np.float32) * mask
    advantages = (np.array([[1.2], [-0.7], [0.3]]) * mask).astype(np.float32)
    positions = np.broadcast_to(np.arange(10), (3, 10)).astype(np.int32)
    batch = {"inputs": inputs, "targets": targets, "positions": positions,
             "segment_ids": np.ones((3, 10), np.int32), "answer_mask": mask, "old_log_probs": old,
             "reference_log_probs": reference, "advantages": advantages}
    clip, beta = 0.2, 0.04
    loss, sums = grpo_loss.make_grpo_loss(clip=clip, kl_coef=beta)(model, batch)

    policy, kl, clipped, ratios = 0.0, 0.0, 0, 0.0
    for row in range(3):
        for t in np.flatnonzero(mask[row]):
            ratio = math.exp(log_probs[row, t] - old[row, t])
            a = advantages[row, t]
            policy += max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
            d = reference[row, t] - log_probs[row, t]
            kl += math.exp(d) - d - 1
            clipped += abs(ratio - 1) > clip
            ratios += ratio
    assert 0 < clipped < mask.sum()  # the example exercises the clip
    assert float(sums["weight"]) == mask.sum() == 13
    assert float(loss) == pytest.approx(policy + beta * kl, rel=1e-4)
    assert float(sums["policy_loss"]) == pytest.approx(policy, rel=1e-4)
    assert float(sums["kl"]) == pytest.approx(kl, rel=1e-4)
    assert float(sums["clip_fraction"]) == clipped
    assert float(sums["ratio"]) == pytest.approx(ratios, rel=1e-4)
    for name in ("approx_kl", "entropy"):
        assert float(sums[name]) > 0

    # The k3 term's gradient flows through the current policy: with no advantages it alone moves it.
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = grpo_loss.make_grpo_loss(clip=clip, kl_coef=beta)
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), dict(batch, advantages=0 * advantages))[0])(params)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


class FixedLogits(nnx.Module):
    """A 'model' whose logits are a parameter: any log-prob at any position, on demand."""

    def __init__(self, logits: np.ndarray):
        self.logits = nnx.Param(jnp.asarray(logits))

    def __call__(self, inputs, positions=None, segment_ids=None):
        return self.logits[...]


def test_the_loss_its_gradient_and_the_kl_are_finite_whatever_lies_outside_the_answers():
    # Row 0's last slot is padding: its target, token 0, has log-prob about -100 under the policy,
    # and the rollout stored 0 there for the reference (rows are masked): exp(0 - (-100)) overflows.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 16)).astype(np.float32)
    logits[0, 5, 0] = -100.0
    inputs = rng.integers(1, 16, (2, 6)).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)
    log_probs = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits)), targets[..., None], -1)[..., 0])
    assert log_probs[0, 5] < -90
    reference = (log_probs + rng.uniform(-0.3, 0.3, log_probs.shape)).astype(np.float32) * mask
    batch = {"inputs": inputs, "targets": targets, "positions": np.broadcast_to(np.arange(6), (2, 6)).astype(np.int32),
             "segment_ids": np.ones((2, 6), np.int32), "answer_mask": mask, "old_log_probs": log_probs * mask,
             "reference_log_probs": reference, "advantages": np.full((2, 6), 0.5, np.float32) * mask}
    model = FixedLogits(logits)
    loss_fn = grpo_loss.make_grpo_loss(clip=0.2, kl_coef=0.04)
    graphdef, params = nnx.split(model, nnx.Param)
    (loss, sums), grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch), has_aux=True)(params)
    assert np.isfinite(float(loss)) and np.isfinite(float(sums["kl"]))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(grads))
    # The answers' k3 is what it is without the padding: the same loss with that slot's log-prob ordinary.
    ordinary = logits.copy()
    ordinary[0, 5, 0] = 0.0
    other, _ = loss_fn(FixedLogits(ordinary), batch)
    assert float(loss) == pytest.approx(float(other), rel=1e-6)
    # The rollout's KL estimates: 0 outside the answers, finite inside.
    k1, k3 = ppo_loss.kl_estimates(log_probs, reference, mask)
    assert np.all(np.isfinite(k3)) and np.all(k1[mask == 0] == 0) and np.all(k3[mask == 0] == 0)


def test_the_program_reward_is_called_with_the_dialog_and_the_answer_text():
    CALLS.clear()
    dialogs = [({"role": "user", "content": "Who are you?"},),
               ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hail."},
                {"role": "user", "content": "Name a play."})]
    # The split's prompts 2 and 0 fit; the answers' indices are positions among those that fit.
    prompts = PromptSet([Prompt(dialogs[1]), Prompt(({"role": "user", "content": "too long"},)), Prompt(dialogs[0])],
                        [2, 0], [[1, 5], [1, 6]], 1)
    answers = [Answer(1, 0, (*TOKENIZER.encode("Hamlet.", bos=False, eos=False), TOKENIZER.eos_id), True),
               Answer(0, 1, tuple(TOKENIZER.encode(" I am", bos=False, eos=False)), False)]
    rewards = on_policy.Rewards(ConfigDict(dict(reward_fn=f"{__name__}:recording_reward")), "grpo", TOKENIZER)
    scores, metrics, _ = rewards(None, prompts, [[1, 6], [1, 5]], answers, np.array([1, 0]), None, None, None)
    assert CALLS == [([dict(message) for message in dialogs[1]], "Hamlet."),
                     ([dict(message) for message in dialogs[0]], "I am")]
    assert scores.tolist() == [len("Hamlet.") % 3, len("I am") % 3] and metrics == {"reward": np.mean(scores)}


def test_follows_instruction_reads_the_instruction_back_from_the_prompt():
    characters, plays = load_characters_and_plays()
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        instructions = InstructionSet.sample(rng, characters, plays)
        seen.add((len(instructions.instructions), instructions.short))
        messages = [{"role": "user", "content": instructions.append_to("Tell me of the storm.")},
                    {"role": "assistant", "content": "It raged."}, {"role": "user", "content": "And then?"}]
        followed = instructions.apply("The sea rose.")
        assert follows_instruction(messages, followed) == 1.0
        assert follows_instruction(messages, f"  {followed}\n") == 1.0  # a decoded answer's whitespace
        assert follows_instruction(messages, "The sea rose.") == 0.0
        for one in instructions.instructions:  # following one of two is not following the set
            expected = float(len(instructions.instructions) == 1)
            assert follows_instruction(messages, one.apply("The sea rose.")) == expected
    assert seen == {(1, True), (1, False), (2, True), (2, False)}
    assert follows_instruction([{"role": "user", "content": "Tell me of the storm."}], "HAMLET: No.") == 0.0
    assert follows_instruction([{"role": "user", "content": "Storm.\n\nFigure: NOBODY"}], "NOBODY: No.") == 0.0


def test_rewards_from_the_reward_models_are_combined_and_the_first_ratio_is_one():
    model = Llama(CONFIG, rngs=nnx.Rngs(2))
    frozen = FrozenModels(Llama(CONFIG, rngs=nnx.Rngs(3)), LlamaRewardModel(CONFIG, rngs=nnx.Rngs(4)),
                                       LlamaRewardModel(CONFIG, rngs=nnx.Rngs(5)))
    rng = np.random.default_rng(0)
    prompt_tokens = [rng.integers(3, 64, length).tolist() for length in (3, 5)]
    prompts = PromptSet([Prompt(({"role": "user", "content": "x"},), safety) for safety in (True, False)], [0, 1],
                        prompt_tokens, 0)
    answers = [Answer(group, sample, tuple(rng.integers(3, 64, 2 + sample).tolist()), bool(sample % 2))
               for group in range(2) for sample in range(3)]
    indices = np.array([answer.prompt for answer in answers])
    config = _config(group_size=3, rollouts=6, batch=6)
    settings = on_policy.settings_of(grpo.ALGORITHM, config, eos_id=2)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rows, metrics = on_policy.score_rollout(grpo.ALGORITHM, config.grpo, model, frozen,
                                            on_policy.Rewards(config.grpo, "grpo", None), prompts, answers, indices,
                                            settings, mesh, sharding.DEFAULT_RULES)
    sequences = [[*prompt_tokens[a.prompt], *a.tokens, *(() if a.finished else (2,))] for a in answers]
    helpfulness, safety = (score_tokens(rm, sequences, batch_size=6, mesh=mesh, rules=sharding.DEFAULT_RULES)
                           for rm in (frozen.helpfulness, frozen.safety))
    combined = combine(helpfulness, safety, prompts.is_safety[indices])
    expected = grpo_loss.group_advantages(combined, indices)
    # The scores of two programs agree to 1e-6; standardising divides that by the group's spread.
    spread = min(float(np.std(combined[indices == group])) for group in set(indices.tolist()))
    assert [row[mask > 0][0] for row, mask in zip(rows["advantages"], rows["answer_mask"])] == \
        pytest.approx(expected, abs=standardised_tolerance(1e-6, spread))
    assert metrics["reward_combined"] == pytest.approx(float(combined.mean()), abs=1e-6)
    assert {"reward_helpfulness", "reward_safety", "safety_share", "kl_reference", "eos_rate"} <= set(metrics)
    _, sums = grpo_loss.make_grpo_loss(clip=0.2, kl_coef=0.04)(model, rows)
    assert float(sums["ratio"] / sums["weight"]) == pytest.approx(1.0, abs=1e-5)
    assert float(sums["clip_fraction"]) == 0 and float(sums["kl"]) > 0


def _config(group_size, rollouts, batch):
    from configs.grpo import get_config

    config = get_config("tiny")
    config.grpo.group_size, config.grpo.rollouts, config.train.global_batch_size = group_size, rollouts, batch
    config.train.seq_len = 16
    return config


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    """A random policy with the bundled tokenizer, and a small set of prompts."""
    root = tmp_path_factory.mktemp("grpo_models")
    (root / "policy").symlink_to(random_models / "policy")  # the session's random policy
    records = [{"messages": [{"role": "user", "content": f"Continue this speech:\n{line}"}]} for line in LINES]
    (root / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def argv(models, workdir, *extra):
    return ["grpo", "--config=configs/grpo.py:tiny", f"--workdir={workdir}",
            f"--config.init_checkpoint={models / 'policy'}", "--config.model.n_layers=2",
            f"--config.grpo.reward_fn={__name__}:recording_reward",
            "--config.data.dataset=grpo_test_prompts", f"--config.data.paths=('{models / 'prompts.jsonl'}',)",
            "--config.data.format=prompts", "--config.data.holdout_fraction=0.3",
            f"--config.data.data_dir={models / 'tfds'}", "--config.grpo.iterations=2", "--config.grpo.rollouts=16",
            "--config.grpo.group_size=4", "--config.train.global_batch_size=8", "--config.grpo.max_new_tokens=6",
            "--config.grpo.batch_size=16", "--config.grpo.eval_prompts=2", "--config.train.eval_every=2",
            "--config.train.seq_len=64", "--config.train.checkpoint_every=1", "--config.optimizer.peak_lr=1e-3",
            *extra]


def logged(workdir):
    return [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grpo_run")
    CALLS.clear()
    assert cli.main(argv(models, workdir)) == 0
    return workdir, list(CALLS)


def test_a_run_trains_on_groups_of_its_own_answers_rewarded_by_the_program(uninterrupted, models):
    workdir, calls = uninterrupted
    records = logged(workdir)
    steps = [record for record in records if "policy_loss" in record]
    assert [record["step"] for record in steps] == [2, 4]  # one line per iteration of 16 / 8 mini-batches
    assert steps[0]["kl_reference"] == pytest.approx(0.0, abs=1e-5)  # the policy is still the reference
    for name in ("reward", "reward_group_std", "groups_all_equal", "kl", "clip_fraction", "approx_kl", "entropy",
                 "ratio", "answer_length", "eos_rate", "rollout_s", "scoring_s"):
        assert name in steps[0], name
    assert steps[1]["kl_reference"] > 0  # the policy moved
    assert [record["step"] for record in records if "eval_reward" in record] == [0, 2, 4]
    # Two iterations of 16 answers, and 2 held-out answers at each of 3 evaluations.
    assert len(calls) == 2 * 16 + 3 * 2
    dialogs = [[{"role": "user", "content": f"Continue this speech:\n{line}"}] for line in LINES]
    assert all(messages in dialogs and isinstance(answer, str) for messages, answer in calls)
    rollout = np.load(workdir / "train" / "rollouts" / "iteration_00001.npz")
    assert set(grpo_loss.FLOAT_FIELDS) <= set(rollout.files)
    assert len((workdir / "held_out" / "step_4.jsonl").read_text().splitlines()) == 2
    policy = load_pretrained(workdir, "float32")
    assert isinstance(policy, Llama)
    assert not np.allclose(policy.output.kernel[...], load_pretrained(models / "policy", "float32").output.kernel[...])


def test_a_run_stopped_mid_iteration_resumes_to_the_same_rewards_and_losses(models, uninterrupted, tmp_path,
                                                                            monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(loop, "StopRequests", stop_when(lambda step: step == 3))  # inside iteration 2
        assert cli.main(argv(models, tmp_path)) == 75
    assert cli.main(argv(models, tmp_path)) == 0
    expected = [record for record in logged(uninterrupted[0]) if record["step"] in (2, 4)]
    resumed = [record for record in logged(tmp_path) if record["step"] in (2, 4)]
    assert len(resumed) == len(expected) == 4
    for got, want in zip(resumed, expected):
        for name in ("reward", "kl_reference", "loss", "policy_loss", "kl", "eval_reward", "eval_kl_reference"):
            if name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    final = load_pretrained(tmp_path, "float32").output.kernel[...]
    np.testing.assert_allclose(final, load_pretrained(uninterrupted[0], "float32").output.kernel[...], atol=1e-6)


def test_bad_input_is_one_clear_error(models, tmp_path, capsys):
    cases = [
        (["--config.grpo.group_size=1", "--config.grpo.rollouts=8"], 2, "grpo.group_size 1 must be at least 2"),
        (["--config.grpo.rollouts=24", "--config.grpo.group_size=5"], 2,
         "grpo.rollouts 24 is not a multiple of grpo.group_size 5"),
        (["--config.grpo.rollouts=12"], 2, "grpo.rollouts 12 is not a multiple of the mini-batch"),
        (["--config.grpo.reward_fn=no_such_module_here:score"], 1,
         "grpo.reward_fn 'no_such_module_here:score': cannot import no_such_module_here"),
        (["--config.grpo.reward_fn=no_colon"], 2, "grpo.reward_fn is 'no_colon'; give it as module:function"),
    ]
    for extra, code, message in cases:
        assert cli.main(argv(models, tmp_path / "bad", *extra)) == code, extra
        error = capsys.readouterr().err
        assert message in error and error.startswith("error: ") and error.count("\n") == 1, error
    assert not (tmp_path / "bad" / "train" / "checkpoints").exists()
    # A program that returns no number ends the run at its first answer, before any step.
    assert cli.main(argv(models, tmp_path / "no_number", f"--config.grpo.reward_fn={__name__}:not_a_number")) == 1
    assert (f"grpo.reward_fn {__name__}:not_a_number returned 'high'; it must return a finite number"
            in capsys.readouterr().err)
