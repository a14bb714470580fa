"""Figures of a run: drawn from metrics.jsonl, only for what was logged, by the stage runner and by
`python -m llama2_jax plot`."""

import json
import types

import pytest
from matplotlib import image

from llama2_jax import cli, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTOGRAM = [0.0, 0.1, 0.3, 0.4, 0.2]


def write_metrics(workdir, records):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)
    return workdir


def training_records(steps=(10, 20, 30)):
    return [{"step": step, "loss": 8.0 - step / 10, "learning_rate": step * 1e-4, "tokens_per_s": 3000.0 + step,
             "grad_norm": 1.0} for step in steps]


def pretraining_records():
    evaluations = [{"step": step, "eval_loss": 8.3 - step / 10, "eval_next_line_choice_accuracy": 0.25 + step / 100,
                    "eval_next_line_choice_accuracy_norm": 0.25 + step / 90, "eval_weight": 16101.0}
                   for step in (0, 30)]
    return [evaluations[0], *training_records(), evaluations[1]]


def reward_records():
    evaluation = {"step": 30, "eval_loss": 0.5, "eval_accuracy": 0.8, "eval_accuracy_better": 0.9,
                  "eval_accuracy_better_weight": 60.0, "eval_accuracy_both_unsafe": 0.0,
                  "eval_accuracy_both_unsafe_weight": 0.0, "eval_chosen_score": 0.3, "eval_rejected_score": -2.0,
                  "eval_score_margin": 2.3, "eval_weight": 800.0, "eval_chosen_score_histogram": HISTOGRAM,
                  "eval_rejected_score_histogram": HISTOGRAM[::-1]}
    return [*training_records(), evaluation]


def assert_drawn(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.var() > 1e-3, f"{path} is blank"


def drawn_names(paths):
    return [path.rsplit("/", 1)[-1] for path in paths]


def test_a_pretraining_run_gets_loss_learning_rate_throughput_and_task_accuracy(tmp_path):
    workdir = write_metrics(tmp_path, pretraining_records())
    written = plots.draw_run(workdir)
    assert drawn_names(written) == ["loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png"]
    for path in written:
        assert_drawn(tmp_path / path.rsplit("/", 1)[-1])


def test_a_reward_run_also_gets_its_score_histogram(tmp_path):
    workdir = write_metrics(tmp_path, reward_records())
    (workdir / "config.json").write_text(json.dumps({"data": {"dataset": "shakespeare_helpfulness"}}))
    assert drawn_names(plots.draw_run(workdir)) == [
        "loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png", "score_histogram.png"]
    assert_drawn(workdir / "score_histogram.png")
    assert_drawn(workdir / "eval_metrics.png")


def test_only_metrics_that_were_logged_are_drawn(tmp_path):
    workdir = write_metrics(tmp_path, [{"step": step, "loss": 3.0 / step} for step in (1, 2, 3)])
    assert drawn_names(plots.draw_run(workdir)) == ["loss.png"]
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["loss.png"]
    assert plots.draw_run(write_metrics(tmp_path / "empty", [])) == []


def test_held_out_panels_hold_shares_and_other_values_but_not_counts_or_values_measured_on_nothing():
    panels = plots.held_out_panels(plots.scalar_series(reward_records()))
    assert [(title, sorted(lines)) for title, _, lines in panels] == [
        ("held-out accuracy", ["accuracy", "accuracy_better"]),
        ("other held-out metrics", ["chosen_score", "rejected_score", "score_margin"])]


def test_plot_command_draws_and_names_the_missing_metrics_and_the_fix(tmp_path, capsys):
    workdir = write_metrics(tmp_path / "run", pretraining_records())
    assert cli.main(["plot", str(workdir)]) == 0
    assert capsys.readouterr().out.split() == [str(workdir / name) for name in (
        "loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png")]

    missing = tmp_path / "missing"
    assert cli.main(["plot", str(missing)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(missing / "metrics.jsonl") in error
    assert "give the --workdir of a train, sft, reward or rejection run" in error

    assert cli.main(["plot", str(write_metrics(tmp_path / "empty", []))]) == 1
    assert "holds no metrics yet" in capsys.readouterr().err
    assert cli.main(["plot"]) == 2


@pytest.mark.parametrize("interrupted", [False, True])
def test_the_stage_runner_draws_when_a_run_ends_interrupted_or_not(monkeypatch, tmp_path, interrupted):
    from llama2_jax.stages import pretrain

    def run(config, workdir):
        write_metrics(tmp_path, training_records())
        return types.SimpleNamespace(interrupted=interrupted)

    monkeypatch.setattr(pretrain, "run", run)
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}"]) == (75 if interrupted else 0)
    for name in ("loss.png", "learning_rate.png", "throughput.png"):
        assert_drawn(tmp_path / name)
    assert not (tmp_path / "eval_metrics.png").exists()


def test_a_figure_that_cannot_be_drawn_does_not_fail_the_run(monkeypatch, tmp_path, caplog):
    from llama2_jax.stages import pretrain

    def run(config, workdir):
        write_metrics(tmp_path, training_records())
        return types.SimpleNamespace(interrupted=False)

    def draw_run(workdir):
        raise OSError(f"No space left on device: {workdir}/loss.png")

    monkeypatch.setattr(pretrain, "run", run)
    monkeypatch.setattr(plots, "draw_run", draw_run)
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}"]) == 0
    assert "could not draw the run's figures: No space left on device" in caplog.text
