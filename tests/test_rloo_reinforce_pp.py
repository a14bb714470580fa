"""RLOO and REINFORCE++, two algorithms of the on-policy stage: their advantages against hand
computations, and a run of each on a program reward."""

import json
import math

import numpy as np
import pytest
from ml_collections import ConfigDict

from llama2_jax import cli
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.stages import on_policy, reinforce_pp, rloo


def rollout(rewards, groups, mask, kl):
    mask, kl = np.asarray(mask, np.float32), np.asarray(kl, np.float32)
    zeros = np.zeros_like(mask)
    return on_policy.Rollout(mask, np.asarray(rewards, np.float32), np.ones(len(rewards), bool), np.asarray(groups),
                             zeros, zeros, None, kl * mask)


MASK = [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
KL = [[0.0, 0.1, -0.2, 0.3, 0.0], [0.0, 0.5, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.2, -0.1], [0.0, -0.3, 0.0, 0.0, 0.0]]


def test_rloo_advantages_match_a_hand_computation():
    rewards, groups, beta = [1.0, 0.0, 0.5, 2.0], [0, 0, 1, 1], 0.1
    # Each answer's reward less beta times its summed KL, then less the mean of its group's other answers.
    penalised = [1.0 - 0.1 * 0.2, 0.0 - 0.1 * 0.6, 0.5 - 0.1 * 0.3, 2.0 - 0.1 * -0.3]
    expected = [penalised[0] - penalised[1], penalised[1] - penalised[0],
                penalised[2] - penalised[3], penalised[3] - penalised[2]]
    fields, metrics = rloo.advantages(rollout(rewards, groups, MASK, KL), ConfigDict(dict(kl_coef=beta)))
    advantages = fields["advantages"]
    for row in range(4):
        assert advantages[row][np.asarray(MASK[row]) > 0] == pytest.approx([expected[row]] * sum(MASK[row]), abs=1e-6)
        assert np.all(advantages[row][np.asarray(MASK[row]) == 0] == 0)
    assert metrics["reward_with_kl"] == pytest.approx(np.mean(penalised), abs=1e-6)
    # Groups of three: the baseline is the mean of the other two.
    baselines = rloo.leave_one_out_baselines([3.0, 0.0, 6.0, 1.0, 1.0, 4.0], [7, 7, 7, 2, 2, 2])
    assert baselines.tolist() == pytest.approx([3.0, 4.5, 1.5, 2.5, 2.5, 1.0])


def test_reinforce_pp_advantages_match_a_hand_computation():
    rewards, beta = [1.0, 0.0, 0.5, 2.0], 0.1
    returns = []
    for row in range(4):
        mask, kl = np.asarray(MASK[row]), np.asarray(KL[row])
        token_rewards = -beta * kl * mask
        token_rewards[np.flatnonzero(mask)[-1]] += rewards[row]  # the reward on the last answer token
        returns.append([sum(token_rewards[s] for s in range(t, 5)) if mask[t] else None for t in range(5)])
    values = [value for row in returns for value in row if value is not None]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
    fields, _ = reinforce_pp.advantages(rollout(rewards, [0, 1, 2, 3], MASK, KL), ConfigDict(dict(kl_coef=beta)))
    for row in range(4):
        for t in range(5):
            expected = 0.0 if returns[row][t] is None else (returns[row][t] - mean) / std
            assert fields["advantages"][row, t] == pytest.approx(expected, abs=1e-5), (row, t)


def reward_of_length(messages, answer):
    return float(len(answer) % 3)


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("on_policy_models")
    (root / "policy").symlink_to(random_models / "policy")  # the session's random policy
    records = [{"messages": [{"role": "user", "content": f"Continue this speech, part {index}."}]}
               for index in range(12)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


@pytest.mark.parametrize("stage,group_size", [("rloo", 4), ("reinforce_pp", 1)])
def test_a_run_trains_the_policy_on_its_own_rewarded_answers(models, tmp_path, stage, group_size):
    argv = [stage, f"--config=configs/{stage}.py:tiny", f"--workdir={tmp_path}",
            f"--config.init_checkpoint={models / 'policy'}", "--config.model.n_layers=2",
            f"--config.{stage}.reward_fn={__name__}:reward_of_length", "--config.data.dataset=on_policy_test_prompts",
            f"--config.data.paths=('{models / 'prompts.jsonl'}',)", "--config.data.format=prompts",
            "--config.data.holdout_fraction=0.3", f"--config.data.data_dir={models / 'tfds'}",
            f"--config.{stage}.iterations=2", f"--config.{stage}.rollouts=8", f"--config.{stage}.group_size={group_size}",
            "--config.train.global_batch_size=8", f"--config.{stage}.max_new_tokens=6",
            f"--config.{stage}.batch_size=8", f"--config.{stage}.eval_prompts=2", "--config.train.eval_every=2",
            "--config.train.seq_len=64", "--config.optimizer.peak_lr=1e-3"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "policy_loss" in record]
    assert [record["step"] for record in steps] == [1, 2]
    assert steps[0]["kl_reference"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    for name in ("reward", "kl_reference", "answer_length", "eos_rate", "clip_fraction", "rollout_s"):
        assert name in steps[0], name
    assert [record["step"] for record in records if "eval_reward" in record] == [0, 2]
    assert len((tmp_path / "held_out" / "step_2.jsonl").read_text().splitlines()) == 2
    trained = load_pretrained(tmp_path, "float32").output.kernel[...]
    assert not np.allclose(trained, load_pretrained(models / "policy", "float32").output.kernel[...])
