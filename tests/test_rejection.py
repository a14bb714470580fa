"""Rejection sampling: the choice of the best answer per prompt, the pool of the best ever, the paper's
combined reward, a run that resumes in whichever phase it stopped, and bad input."""

import json

import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli, selection
from llama2_jax.checkpoint.convert import export_model
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.tokenizer import Tokenizer, train_tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.reward import combine
from llama2_jax.sharding import model_arrays
from llama2_jax.stages import rejection
from llama2_jax.rollout import sampler as sampler_lib
from llama2_jax.rollout.sampler import Answer
from llama2_jax.train import loop
from stop_requests import stop_when

TOKENIZER = Tokenizer()
LINES = ["O, I am slain!", "Out, damned spot!", "Is this a dagger which I see before me,", "Alas, poor Yorick!",
         "To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen",
         "All the world's a stage", "Once more unto the breach, dear friends", "If music be the food of love",
         "Double, double toil and trouble", "What's in a name?"]


def test_selection_is_the_arg_max_per_prompt_among_usable_answers():
    rewards = np.array([[0.1, 0.9, 0.3], [0.5, 0.5, 0.2], [0.8, 0.1, 0.2], [0.4, 0.6, 0.7]])
    usable = np.array([[True, True, True], [True, True, True], [False, True, True], [False, False, False]])
    assert selection.select_best(rewards, usable).tolist() == [1, 0, 2, -1]  # ties: the first; none usable: -1


def test_the_pool_keeps_the_best_answer_ever_over_three_rounds():
    def offers(round_number, scores):
        return [selection.PoolEntry(prompt, f"answer {prompt} of round {round_number}", score, score, 0.9, round_number)
                for prompt, score in scores.items()]

    pool, changed = selection.update_pool({}, offers(1, {0: 0.5, 1: 0.2, 2: 0.7}))
    assert changed == {0, 1, 2}
    pool, changed = selection.update_pool(pool, offers(2, {0: 0.4, 1: 0.6, 2: 0.7, 3: 0.1}))
    assert changed == {1, 3}  # a tie keeps the older answer
    pool, changed = selection.update_pool(pool, offers(3, {0: 0.45, 1: 0.3, 2: 0.9, 3: 0.05}))
    assert changed == {2}
    assert {prompt: (entry.round, entry.score) for prompt, entry in pool.items()} == {
        0: (1, 0.5), 1: (2, 0.6), 2: (3, 0.9), 3: (2, 0.1)}


@pytest.mark.parametrize("helpfulness, safety, is_safety, expected", [
    (0.9, 0.6, True, 0.6),    # a safety prompt: the safety score
    (0.9, 0.6, False, 0.9),   # a helpfulness prompt with a safe answer: the helpfulness score
    (0.9, 0.1, False, 0.1),   # a helpfulness prompt with an answer below 0.15 on safety: the safety score
    (0.2, 0.15, False, 0.2),  # 0.15 itself is not below the threshold
    (0.9, 0.1, True, 0.1),
])
def test_combine_is_the_papers_reward(helpfulness, safety, is_safety, expected):
    assert combine([helpfulness], [safety], [is_safety])[0] == pytest.approx(expected)
    assert combine([helpfulness], [safety], [is_safety], threshold=0.05)[0] == pytest.approx(
        safety if is_safety else helpfulness)


def test_best_of_k_curves_take_the_first_k_samples():
    rewards = np.array([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.6, 0.0]])
    assert selection.sample_counts(4) == [1, 2, 4] and selection.sample_counts(6) == [1, 2, 4, 6]
    curves = selection.best_of_k(rewards, [1, 2, 4])
    assert curves[1] == pytest.approx((0.25, 0.25))
    assert curves[2] == pytest.approx(((0.5 + 0.4) / 2, (0.3 + 0.3) / 2))
    assert curves[4] == pytest.approx(((0.9 + 0.6) / 2, (0.4 + 0.3) / 2))


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    """A random policy and reward models with the bundled tokenizer, and a small set of prompts."""
    root = tmp_path_factory.mktemp("rejection_models")
    for name in ("policy", "helpfulness", "safety"):
        (root / name).symlink_to(random_models / name)  # the session's random models
    records = [{"messages": [{"role": "user", "content": f"Continue this speech:\n{line}"}], "safety": index % 3 == 0}
               for index, line in enumerate(LINES)]
    records.append({"messages": [{"role": "user", "content": "Continue this speech:\n" + "word " * 300}]})
    (root / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def argv(models, workdir, *extra):
    return ["rejection", "--config=configs/rejection.py:tiny", f"--workdir={workdir}",
            f"--config.init_checkpoint={models / 'policy'}", "--config.model.n_layers=2",
            f"--config.rejection.helpfulness_rm={models / 'helpfulness'}",
            f"--config.rejection.safety_rm={models / 'safety'}",
            "--config.data.dataset=rejection_test_prompts", f"--config.data.paths=('{models / 'prompts.jsonl'}',)",
            "--config.data.format=prompts", "--config.data.holdout_fraction=0.3",
            f"--config.data.data_dir={models / 'tfds'}", "--config.rejection.samples=3",
            "--config.rejection.max_new_tokens=6", "--config.rejection.batch_size=6",
            "--config.rejection.eval_prompts=2", "--config.train.steps=2", "--config.train.global_batch_size=8",
            "--config.train.seq_len=64", "--config.train.log_every=1", "--config.train.checkpoint_every=1", *extra]


def round_1(workdir):
    """What round 1 left: its scored answers, the answers it kept and the policy it trained."""
    candidates = (workdir / "round_1" / "candidates.jsonl").read_text()
    kept = [(c["prompt"], c["answer"]) for c in map(json.loads, candidates.splitlines()) if c["kept"]]
    policy = load_pretrained(str(workdir / "round_1"))
    return candidates, kept, {name: np.asarray(value) for name, value in model_arrays(policy).items()}


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(argv(models, workdir)) == 0
    return workdir


def test_a_run_keeps_every_phase_and_the_policy_in_its_workdir(uninterrupted):
    workdir = uninterrupted
    candidates = [json.loads(line) for line in (workdir / "round_1" / "candidates.jsonl").read_text().splitlines()]
    pool = [json.loads(line) for line in (workdir / "pool.jsonl").read_text().splitlines()]
    prompts = {candidate["prompt"] for candidate in candidates}
    assert len(candidates) == 3 * len(prompts) and len(pool) == len(prompts)
    for entry in pool:  # each pool entry is the best usable answer any round found for its prompt
        offered = [json.loads(line) for number in (1, 2)
                   for line in (workdir / f"round_{number}" / "candidates.jsonl").read_text().splitlines()]
        best = max(c["combined"] for c in offered if c["prompt"] == entry["prompt"] and c["answer"])
        assert entry["score"] == pytest.approx(best, abs=1e-6)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2]
    assert {"best_of_1_max", "best_of_3_median", "pool_reward", "pool_changed", "samples_per_s",
            "sample_seconds", "score_seconds", "train_seconds", "eval_reward"} <= set(records[1])
    assert records[1]["pool_changed"] == 1.0
    assert (workdir / "best_of_k.png").is_file()
    assert json.loads((workdir / "policy.json").read_text()) == {"round": 2}
    assert isinstance(load_pretrained(str(workdir)), Llama)


def test_a_run_stopped_in_each_phase_resumes_to_the_same_pool_and_policy(models, uninterrupted, tmp_path,
                                                                          monkeypatch, capsys):
    # Parts of one slot-load (6 answers: 2 prompts of 3) rather than eight: four parts to stop between.
    # An answer does not depend on its part, so the run ends as the uninterrupted one (one part) did.
    with pytest.MonkeyPatch.context() as parts:
        parts.setattr(sampler_lib, "PART_LOADS", 1)
        workdir, one_round = tmp_path / "stopped", "--config.rejection.rounds=1"
        monkeypatch.setattr(rejection, "StopRequests", stop_when(lambda step: True))
        assert cli.main(argv(models, workdir, one_round)) == 75  # stopped after the first part sampled
        assert list((workdir / "round_1" / "samples").iterdir())
        assert not (workdir / "round_1" / "candidates.jsonl").exists()
        monkeypatch.undo()

        def crash(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(rejection, "score_answers", crash)
        assert cli.main(argv(models, workdir, one_round)) == 130  # killed while scoring: nothing of the phase written
        assert not (workdir / "round_1" / "candidates.jsonl").exists()
        monkeypatch.undo()

        monkeypatch.setattr(loop, "StopRequests", stop_when(lambda step: step >= 1))
        assert cli.main(argv(models, workdir, one_round)) == 75  # stopped in the fine-tuning, its step 1 saved
        assert (workdir / "round_1" / "checkpoints" / "1").is_dir() and not (workdir / "policy.json").exists()
        monkeypatch.undo()

        assert cli.main(argv(models, workdir, one_round)) == 0
        capsys.readouterr()
        candidates, kept, policy = round_1(workdir)
        expected_candidates, expected_kept, expected_policy = round_1(uninterrupted)
        assert candidates == expected_candidates
        pool = [json.loads(line) for line in (workdir / "pool.jsonl").read_text().splitlines()]
        assert [(entry["prompt"], entry["answer"]) for entry in pool] == sorted(kept) == sorted(expected_kept)
        for name, value in expected_policy.items():
            np.testing.assert_array_equal(policy[name], value, err_msg=name)
        assert json.loads((workdir / "policy.json").read_text()) == {"round": 1}


def test_a_finished_run_reruns_without_redoing_work_and_refuses_an_unreadable_candidates_file(
        models, uninterrupted, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("finished work done again")

    monkeypatch.setattr(rejection.Sampler, "sample", never)
    monkeypatch.setattr(rejection, "score_answers", never)
    monkeypatch.setattr(rejection, "train", never)
    assert cli.main(argv(models, uninterrupted)) == 0
    candidates = uninterrupted / "round_2" / "candidates.jsonl"
    saved = candidates.read_text()
    candidates.write_text(saved[: len(saved) // 2] + "\n{not json")
    try:
        assert cli.main(argv(models, uninterrupted)) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "candidates.jsonl cannot be read" in error and "move it aside" in error
    finally:
        candidates.write_text(saved)


def test_bad_input_is_one_clear_error(models, tmp_path, capsys):
    def error_of(*extra):
        code = cli.main(argv(models, tmp_path / "run", *extra))
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return code, error

    assert error_of("--config.rejection.samples=0") == (2, "error: rejection.samples is 0; sample at least 1 answer "
                                                           "per prompt\n")
    code, error = error_of("--config.rejection.temperature=(1.0, 1.1)", "--config.rejection.rounds=3")
    assert code == 2 and "gives 2 values for 3 rounds" in error
    code, error = error_of(f"--config.rejection.safety_rm={models / 'policy'}")
    assert code == 1 and "holds a language model; it must be a reward model" in error
    code, error = error_of(f"--config.init_checkpoint={models / 'safety'}")
    assert code == 1 and "holds a reward model, not a language model; set --config.init_checkpoint to" in error
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    for item in (models / "safety").iterdir():
        if item.name != "tokenizer.model":
            (other / item.name).symlink_to(item)
    train_tokenizer(["Sphinx of black quartz, judge my vow."] * 200, other / "tokenizer", vocab_size=300,
                    from_files=False)
    code, error = error_of(f"--config.rejection.safety_rm={other}")
    assert code == 1 and "has another tokenizer.model than the policy" in error
    assert not (tmp_path / "run" / "round_1").exists()  # nothing started


def test_a_larger_policy_samples_when_given_and_a_round_of_empty_answers_is_refused(models, tmp_path, monkeypatch,
                                                                                   capsys):
    larger = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=3)
    export_model(Llama(larger, rngs=nnx.Rngs(3)), str(tmp_path / "larger"), "orbax", tokenizer_path=str(TOKENIZER.path))
    sampled_by = []

    def at_once_eos(sampler, prompt_tokens, *, samples, eos_id, **kwargs):
        sampled_by.append(sampler.policy.config.n_layers)
        answers = [Answer(prompt, sample, (eos_id,), True) for prompt in range(len(prompt_tokens))
                   for sample in range(samples)]
        return answers, 1.0, False

    monkeypatch.setattr(rejection.Sampler, "sample", at_once_eos)
    assert cli.main(argv(models, tmp_path / "run", "--config.rejection.eval_prompts=0",
                         f"--config.rejection.sample_from={tmp_path / 'larger'}")) == 1
    captured = capsys.readouterr()
    assert sampled_by == [3]  # the policy trained here has 2 layers
    assert "training prompts: 8 of 9 (1 too long to answer in the context, skipped)" in captured.out
    assert "round 1: all 24 answers are empty" in captured.err and captured.err.count("\n") == 1
