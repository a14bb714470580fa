"""Runs the recipe's steps in order in one workdir, each in its own subdirectory, and resumes.

A step that finished leaves `<step>/step.json` (its commands and wall time), and a rerun skips it.
A step stopped in the middle (SIGTERM or Ctrl-C: its stage saves a checkpoint and the pipeline exits
75; killed: whatever it wrote last) is run again by the rerun, which resumes a stage from its
checkpoint and repeats a command (they take minutes at most) whole. `pipeline.json` holds the
settings the workdir was started with: a rerun whose settings differ for a stage already started is
refused, since its outputs would no longer be what those settings make.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import time
from collections.abc import Callable

import jax
import ml_collections

from llama2_jax import storage
from llama2_jax.recipe import report
from llama2_jax.recipe.steps import Invocation, Plan, Step, selected, write_chat_prompts

SETTINGS_FILE, STEP_FILE = "pipeline.json", "step.json"
# Keys of the pipeline's config that do not change what a stage makes.
NOT_SETTINGS = ("stages", "config_files")


class Stopped(BaseException):
    """SIGTERM outside a stage's training loop (which handles it itself)."""


def run(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False) -> int:
    steps = selected(config.stages)
    directory = _directories(workdir)
    plans = {step.name: step.plan(config, directory) for step in steps}
    if dry_run:
        for step in steps:
            plan = plans[step.name]
            key_settings = plan.key_settings()
            print(f"# {step.name}: {step.describe(plan)}" + (f" ({key_settings})" if key_settings else ""))
            if step.instead:
                print(f"#   {step.instead}")
            for key in plan.missing:
                print(f"#   yours to give: config.{key} (--config.{key}=...)")
            if plan.datasets_to_prepare:
                print(f"#   yours to prepare: {', '.join(plan.datasets_to_prepare)} (datasets in data.data_dir: "
                      f"`python -m llama2_jax data build`; or files: --config.{step.name}.data.paths=FILE)")
            for invocation in plan.invocations:
                print(invocation.command_line())
        return 0
    missing = [key for step in steps for key in plans[step.name].missing]
    if missing:
        from llama2_jax.errors import ConfigError

        raise ConfigError(f"the pipeline needs {', '.join(f'config.{key}' for key in missing)}, empty for this size: "
                          "give each (--config.KEY=PATH), or leave its stage out with --config.stages")
    if storage.is_url(workdir):
        raise ValueError(f"--workdir={workdir}: the pipeline's GAtt and distillation rounds build their dialogs as "
                         "local files, so its workdir is a directory every host mounts (for a bucket, through "
                         "Cloud Storage FUSE: --workdir=/gcs/BUCKET/...); each stage's own command takes gs:// "
                         "(docs/multihost.md)")
    root = storage.as_path(workdir)
    _check_settings(config, root)
    _check_needs(steps, plans, root, workdir)
    leader = jax.process_index() == 0
    if leader:
        root.mkdir(parents=True, exist_ok=True)
        (root / SETTINGS_FILE).write_text(json.dumps(settings(config), indent=1, sort_keys=True))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for step in steps:
            if finished(root, step.name):
                _say(f"{step.name}: finished before, skipped ({workdir}/{step.name})")
                continue
            _check_data(step.name, plans[step.name].needs, root, workdir)
            code = _run_step(step, plans[step.name], config, directory, root, leader)
            if code:
                _say(f"stopped in {step.name} (exit status {code}); rerun the same command to go on from there: "
                     "finished stages are kept", error=True)
                return code
    except Stopped:
        from llama2_jax.distributed import RESUMABLE_EXIT_STATUS

        _say("stopped by SIGTERM; rerun the same command to go on: finished stages are kept", error=True)
        return RESUMABLE_EXIT_STATUS
    finally:
        signal.signal(signal.SIGTERM, previous)
    if leader:
        print("\n".join(report.write(config, workdir)))
    return 0


def _run_step(step: Step, plan: Plan, config, directory: Callable[[str], str], root, leader: bool) -> int:
    _say(f"\n=== {step.name}: {step.describe(plan)}")
    invocations = plan.invocations
    start = time.time()
    if leader:
        (root / step.name).mkdir(parents=True, exist_ok=True)
        if step.name == "chat":
            write_chat_prompts(config, directory)
    _sync(f"{step.name} prepared")
    command_lines = [invocation.command_line() for invocation in invocations]
    for invocation, command_line in zip(invocations, command_lines):
        _say(f"$ {command_line}")
        code = execute(invocation, step.name)
        if code:
            return code
    _sync(f"{step.name} finished")
    if leader:
        record = {"seconds": round(time.time() - start, 1), "commands": command_lines}
        (root / step.name / STEP_FILE).write_text(json.dumps(record, indent=1))
    return 0


def execute(invocation: Invocation, step: str) -> int:
    """One command in this process, as `python -m llama2_jax` runs it: its exit status."""
    from llama2_jax import cli, stages

    if invocation.command not in cli.STAGES:
        return importlib.import_module(cli.COMMANDS[invocation.command][0]).main(list(invocation.argv))
    config = invocation.config.copy_and_resolve_references()
    config.lock()
    try:
        return cli.run_stage_config(stages.stage_module(config.stage), config, invocation.workdir)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
        try:
            named = type(error)(f"{step}: {cli.one_line(error)}")
        except Exception:  # an error type that takes other arguments: as it is
            raise error from None
        raise named from error


def finished(root, name: str) -> bool:
    return (root / name / STEP_FILE).exists()


def settings(config: ml_collections.ConfigDict) -> dict:
    """What the workdir's outputs depend on: the config without the stage list and file locations."""
    values = json.loads(config.to_json())
    return {key: value for key, value in values.items() if key not in NOT_SETTINGS}


def _check_settings(config: ml_collections.ConfigDict, root) -> None:
    path = root / SETTINGS_FILE
    if not path.exists():
        return
    before, now = json.loads(path.read_text()), settings(config)
    for key in sorted(set(before) | set(now)):
        started = key == "size" or (root / key).exists()
        if started and before.get(key) != now.get(key):
            changed = _first_difference(before.get(key), now.get(key), key)
            raise ValueError(f"{root} holds a pipeline run with other settings for {key}, already started "
                             f"({changed}); rerun with the settings it was started with, or give another --workdir")


def _first_difference(before, now, key: str) -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                return _first_difference(before.get(name), now.get(name), f"{key}.{name}")
    return f"{key}: {before!r} there, {now!r} here"


def _check_needs(steps: list[Step], plans: dict, root, workdir: str) -> None:
    running = set()
    for step in steps:
        for need in sorted(plans[step.name].needs):
            if need not in running and not finished(root, need):
                raise ValueError(f"stage {step.name} needs {need}, which {workdir} does not hold finished; add "
                                 f"{need} to config.stages, or set the path {step.name} reads to one of yours")
        running.add(step.name)


def _check_data(name: str, needs: set[str], root, workdir: str) -> None:
    """A round that would train on a data step's empty output: one line naming why and the fix."""
    for step in sorted(need for need in needs if need.endswith("_data")):
        dialogs = root / step / "dialogs.jsonl"
        if dialogs.exists() and not dialogs.read_text().strip():
            raise ValueError(f"{step} kept no dialogs for {name} to train on (its output says why: no answer "
                             f"followed the instruction, or none scored safer); remove {workdir}/{step} and rerun "
                             f"with more samples (--config.{step}.samples, gatt_data) or a longer SFT")


def _directories(workdir: str) -> Callable[[str], str]:
    return lambda name: f"{workdir.rstrip('/')}/{name}"


def _stop(signum, frame):
    raise Stopped()


def _sync(name: str) -> None:
    """Every process at the same point: a step's files, written by process 0, are there for all."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _say(line: str, error: bool = False) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr if error else sys.stdout, flush=True)
