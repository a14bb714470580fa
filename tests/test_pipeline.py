"""The whole recipe in one command: every stage runs from the one before in its own subdirectory, a
finished stage is skipped, a stopped one resumes to the same table, the dry run's commands are the
configs the stages run, and bad input is one clear line."""

import json
import os
import re
import shlex
import shutil

import pytest

from llama2_jax import cli, config_cli
from llama2_jax.recipe import run as pipeline_run
from llama2_jax.recipe.steps import STEP_NAMES, STEPS
from llama2_jax.train import loop
from tests.stop_requests import stop_when

CONFIG = "--config=configs/pipeline.py:tiny,quick"


def pipeline(workdir, *extra):
    """`python -m llama2_jax pipeline` on its quick config (every stage a few steps of a two-layer
    model), the config tests/conftest.py's `quick_pipeline` ran."""
    return cli.main(["pipeline", CONFIG, f"--workdir={workdir}", *extra])


def table_figures(workdir) -> list[float]:
    """The numbers of report.md's tables, wall times and the chat answers left out."""
    text = (workdir / "report.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [cell for row in rows for cell in (row[2:] if len(row) == 3 else row[1:])]  # a stage's wall time out
    return [float(number) for cell in cells for number in re.findall(r"-?\d+\.\d+", cell)]


@pytest.fixture(scope="module")
def finished(quick_pipeline, tmp_path_factory):
    """A copy of the session's finished quick run, which the reruns here may write to."""
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(quick_pipeline, workdir, symlinks=True)
    return workdir


def test_every_stage_runs_from_the_one_before_and_the_table_has_each_measure(quick_pipeline):
    finished = quick_pipeline
    for name in STEP_NAMES:
        assert (finished / name / "step.json").is_file(), name
    config = json.loads((finished / "ppo" / "train" / "config.json").read_text())
    assert config["init_checkpoint"] == f"{finished}/distill"
    assert config["ppo"]["safety_rm"] == f"{finished}/reward_safety"
    report = (finished / "report.md").read_text()
    for name in STEP_NAMES:
        assert f"| {name} |" in report, name
    assert "held-out accuracy" in report and "held-out R_c" in report and "task accuracy" in report
    policies = json.loads((finished / "evaluate" / "policies.json").read_text())["policies"]
    assert [row["policy"] for row in policies] == [f"{finished}/{name}" for name in ("sft", "rejection", "gatt",
                                                                                       "distill", "ppo")]
    assert policies[0]["kl_reference"] == 0 and all(0 <= row["reward_combined"] <= 1 for row in policies)
    assert (finished / "pipeline.png").stat().st_size > 0


def test_a_rerun_skips_every_finished_stage(finished, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline_run, "execute", must_not_run)
    assert pipeline(finished) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == len(STEPS)


def test_a_run_stopped_in_ppo_and_by_sigterm_in_chat_ends_with_the_same_table(finished, tmp_path,
                                                                              monkeypatch):
    for name in STEP_NAMES[: STEP_NAMES.index("ppo")]:
        shutil.copytree(finished / name, tmp_path / name)
    shutil.copy(finished / "pipeline.json", tmp_path / "pipeline.json")
    monkeypatch.setattr(loop, "StopRequests", stop_when(lambda step: step == 3))
    assert pipeline(tmp_path) == 75
    assert (tmp_path / "ppo" / "train" / "checkpoints").is_dir() and not (tmp_path / "ppo" / "step.json").exists()
    monkeypatch.undo()

    from llama2_jax.commands import generate

    def sigterm_once(argv):
        monkeypatch.setattr(generate, "main", original)
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)

    original = generate.main
    monkeypatch.setattr(generate, "main", sigterm_once)
    assert pipeline(tmp_path) == 75
    assert (tmp_path / "evaluate" / "step.json").exists() and not (tmp_path / "chat" / "step.json").exists()
    assert pipeline(tmp_path) == 0
    assert table_figures(tmp_path) == pytest.approx(table_figures(finished), abs=2e-3)


@pytest.mark.parametrize("size", ["tiny", "tiny,quick", "7b", "70b"])
def test_the_dry_run_prints_each_stage_command_which_parses_to_the_config_it_runs(size, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["pipeline", f"--config=configs/pipeline.py:{size}", f"--workdir={workdir}", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0][2:] for line in printed if line.startswith("# ") and line[2] != " "] == \
        list(STEP_NAMES)
    assert not workdir.exists()
    config = config_cli.load_config_file(f"configs/pipeline.py:{size}")
    directory = pipeline_run._directories(str(workdir))
    for step in STEPS:
        for invocation in step.plan(config, directory).invocations:
            assert invocation.command_line() in printed
            argv = shlex.split(invocation.command_line())[4:]
            if invocation.config is not None:
                parsed, rest = config_cli.parse_config_flags(argv)
                assert rest == [f"--workdir={workdir}/{step.name}"]
                assert absolute(parsed.to_dict()) == absolute(invocation.config.to_dict()), step.name


def test_the_dry_run_of_a_paper_size_marks_what_is_yours_to_give_and_where_each_stage_starts(tmp_path, capsys):
    def dry_run(*flags):
        assert cli.main(["pipeline", "--config=configs/pipeline.py:7b", f"--workdir={tmp_path}", "--dry-run",
                         *flags]) == 0
        return capsys.readouterr().out

    printed = dry_run()
    assert "#   yours to give: config.pretrain.data.dataset" in printed
    assert '"--config.data.dataset=<config.sft.data.dataset>"' in printed
    assert "#   yours to prepare: meta_helpfulness, meta_safety, open_helpfulness, anthropic_harmless" in printed
    assert "#   yours to prepare: rlhf_prompts" in printed
    assert "# sft: supervised fine-tuning on dialogs, from pretrain" in printed
    printed = dry_run("--config.stages=sft,reward_helpfulness", "--config.sft.init_checkpoint=llama-2-7b",
                      "--config.sft.data.dataset=my_dialogs")
    assert "# sft: supervised fine-tuning on dialogs, from llama-2-7b" in printed
    assert "yours to give" not in printed and "# pretrain" not in printed
    assert cli.main(["pipeline", "--config=configs/pipeline.py:7b", f"--workdir={tmp_path}"]) == 2
    assert "the pipeline needs config.pretrain.data.dataset, config.sft.data.dataset" in capsys.readouterr().err


def absolute(value):
    """A config's values with the paths shown relative to the current directory made absolute."""
    if isinstance(value, dict):
        return {key: absolute(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(absolute(item) for item in value)
    return os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value


def test_bad_input_is_one_clear_line_and_nothing_is_lost(finished, tmp_path, capsys):
    assert cli.main(["pipeline", CONFIG, f"--workdir={tmp_path}", "--config.stages=sft,rlhf"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown stage 'rlhf'" in error and "reward_helpfulness" in error

    assert cli.main(["pipeline", CONFIG, f"--workdir={tmp_path}", "--config.stages=ppo"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "stage ppo needs distill" in error and "config.stages" in error
    assert not list(tmp_path.iterdir())

    before = sorted(path.name for path in finished.rglob("*"))
    assert pipeline(finished, "--config.sft.optimizer.peak_lr=0.5") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "other settings for sft" in error and "sft.optimizer.peak_lr" in error
    assert sorted(path.name for path in finished.rglob("*")) == before
