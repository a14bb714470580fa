"""`python -m llama2_jax <command>`: the command table, and how every command reports failure.

A stage of the recipe (pretraining, SFT, the reward models, rejection sampling) is a module of
`llama2_jax/stages/` with a config file in `configs/`; its command is the shared stage runner
below, so adding a stage is one module, one config file and one line in `stages.STAGES`. Commands
that are not stages live in `llama2_jax/commands/`, one module each with a `main(argv)`.

Exit status: 0 on success, 2 for a usage error (an unknown flag, config key or value), 1 for a
runtime error (bad data, a missing checkpoint, a model that does not fit), 75 for a stage stopped
by SIGTERM or Ctrl-C with its checkpoint saved (rerun the same command to resume: what
launch/gpu_slurm.sbatch requeues on). An error is one line on stderr that names the problem and the fix; set LLAMA2_JAX_TRACEBACK=1 to see the
traceback instead. `--help` works for every command, and with `--config` it also lists every key
of that config with its value and what it means.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from llama2_jax import stages
from llama2_jax.errors import one_line

# command: the stage it runs (llama2_jax/stages/__init__.py holds the table).
STAGES = {stage.command: stage for stage in stages.STAGES.values()}
COMMANDS = {
    "generate": ("llama2_jax.commands.generate", "sample completions for a file of prompts"),
    "score": ("llama2_jax.commands.score", "score responses to prompts with a reward model"),
    "chat": ("llama2_jax.commands.chat", "interactive chat with a checkpoint"),
    "eval": ("llama2_jax.commands.eval", "perplexity on held-out text, or a multiple-choice task"),
    "convert": ("llama2_jax.commands.convert", "convert checkpoints between meta, hf and orbax"),
    "tokenizer": ("llama2_jax.commands.tokenizer", "train or inspect a SentencePiece tokenizer"),
    "data": ("llama2_jax.commands.data", "build, tokenize and inspect datasets"),
    "gatt": ("llama2_jax.commands.gatt", "build Ghost Attention dialogs with the current policy"),
    "gatt-eval": ("llama2_jax.commands.gatt_eval", "does a model keep following a first-turn instruction?"),
    "distill": ("llama2_jax.commands.distill", "safety context distillation: answers under a safety preprompt"),
    "bench": ("llama2_jax.commands.bench", "training and sampling throughput benchmarks"),
    "aot": ("llama2_jax.commands.aot", "compile a stage's training step ahead of time; memory per device"),
    "plot": ("llama2_jax.commands.plot", "draw a run's loss, learning rate, throughput and evaluation figures"),
    "compare": ("llama2_jax.commands.compare", "policies side by side: held-out reward by both RMs, KL to a reference"),
    "pipeline": ("llama2_jax.commands.pipeline", "the whole recipe in one command, each stage in its own subdirectory"),
}
# Commands that run one process per host on a pod or cluster, and so join the job first.
MULTI_PROCESS_COMMANDS = (*STAGES, "generate", "score", "bench", "pipeline")


class UsageError(ValueError):
    """The command line itself is wrong (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the fix, not a usage dump."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        raise UsageError(f"{message}; see {self.prog} --help")


def print_phase(line: str) -> None:
    """A long command's next phase as it starts (`turn 2: answering 60 dialogs`), printed by process 0
    at once, so a run off a terminal, where no progress bar is drawn, still shows where it is."""
    import jax

    if jax.process_index() == 0:
        print(line, flush=True)


def reports_errors(main: Callable[[Sequence[str]], int | None]) -> Callable[[Sequence[str]], int]:
    """Wraps a command's `main(argv)`: errors become one stderr line and an exit status."""
    from llama2_jax.errors import ConfigError

    @functools.wraps(main)
    def wrapped(argv: Sequence[str], **keywords) -> int:
        try:
            return main(list(argv), **keywords) or 0
        except SystemExit as exit_request:  # argparse's --help
            return int(exit_request.code or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (UsageError, ConfigError) as error:
            code, message = 2, one_line(error)
        except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
            if os.environ.get("LLAMA2_JAX_TRACEBACK"):
                raise
            code, message = 1, one_line(error)
        print(f"error: {message}", file=sys.stderr)
        return code

    return wrapped


@reports_errors
def run_stage(argv: Sequence[str], *, command: str, module_name: str) -> int:
    """The command of every stage: `--config=configs/<stage>.py:SIZE [--config.a.b=v ...] --workdir=DIR`."""
    from llama2_jax import config_cli

    stage = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"python -m llama2_jax {command}", description=stage.__doc__)
    parser.add_argument("--config", metavar="FILE.py:SIZE",
                        help=f"the stage's config file and size, e.g. configs/{stage.STAGE}.py:tiny; "
                        "then --config.SECTION.KEY=VALUE overrides any key (listed by --help with --config)")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints, metrics and TensorBoard go here; rerunning resumes from it")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        from llama2_jax import config_help

        config_help.print_config_help(argv)
        return 0
    config, rest = config_cli.parse_config_flags(argv)
    if config.stage != stage.STAGE:
        owner = stages.stage_of(config.stage).command
        raise UsageError(f"that config is for the {config.stage} stage; run `python -m llama2_jax {owner}`")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_stage_config(stage, config, args.workdir)


def run_stage_config(stage, config, workdir: str) -> int:
    """What a stage's command does once its config is parsed (also what `pipeline` runs per stage):
    run it in `workdir`, draw its figures, and 75 if it stopped early with its checkpoint saved."""
    from llama2_jax import storage

    storage.check_filesystem(workdir)  # before the data and weights are read, not after
    result = stage.run(config, workdir)
    from llama2_jax.plots import draw_figures

    draw_figures(workdir)
    if result.interrupted:
        from llama2_jax.distributed import RESUMABLE_EXIT_STATUS

        print(f"stopped with a checkpoint saved in {workdir}; rerun the same command to resume",
              file=sys.stderr)
        return RESUMABLE_EXIT_STATUS
    return 0


def _usage() -> str:
    width = max(map(len, {**STAGES, **COMMANDS}))
    lines = ["usage: python -m llama2_jax <command> [flags]   (python -m llama2_jax <command> --help)", "",
             "stages of the recipe:"]
    lines += [f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items()]
    lines += ["", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in STAGES and command not in COMMANDS:
        print(f"error: unknown command {command!r}; run `python -m llama2_jax --help` for the list",
              file=sys.stderr)
        return 2
    if command in MULTI_PROCESS_COMMANDS and not {"-h", "--help"} & set(rest):
        from llama2_jax.distributed import LayoutError, initialize_from_environment

        try:
            initialize_from_environment()
        except LayoutError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 1
    if command in STAGES:
        return run_stage(rest, command=command, module_name=STAGES[command].module)
    return importlib.import_module(COMMANDS[command][0]).main(rest)
