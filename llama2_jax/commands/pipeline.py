"""`python -m llama2_jax pipeline`: the whole Llama 2-Chat recipe in one command.

    python -m llama2_jax pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline
    python -m llama2_jax pipeline --config=configs/pipeline.py:7b --workdir=/gcs/BUCKET/7b --dry-run
    python -m llama2_jax pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline --config.stages=ppo,evaluate

Pretraining, SFT, the helpfulness and safety reward models, rejection sampling, the Ghost Attention
round sampled from the rejection-sampling policy, safety context distillation, PPO, evaluation and a
chat sample, each stage in its own subdirectory of the workdir, started from the stage before it
(configs/pipeline.py lists them). A finished stage is skipped; a stopped one (SIGTERM, Ctrl-C: exit
status 75) resumes when the same command is run again. `--config.stages` runs some of them (each
stage it names must find the stages it reads from finished in the workdir, or run them too). At the
end: one table of every stage's measure (also `report.md`) and `pipeline.png`. `--dry-run` prints
every stage's command, which is also what a stage runs, and runs nothing. `--config.mesh.KEY=VALUE`
sets that mesh key for every stage (`--config.mesh.ici_tensor=8`; launch/tpu_pod.sh adds
`--config.mesh.dcn_data=N` for N slices).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llama2_jax.cli import ArgumentParser, UsageError, reports_errors


def every_stage_mesh(argv: Sequence[str], config) -> list[str]:
    """`--config.mesh.KEY=V` (or `--config.mesh.KEY V`) as that flag for each stage section of the
    pipeline's config."""
    import ml_collections

    stages = [name for name, section in config.items()
              if isinstance(section, ml_collections.ConfigDict) and "mesh" in section]
    result, args = [], iter(argv)
    for arg in args:
        if not arg.startswith("--config.mesh."):
            result.append(arg)
            continue
        key, has_value, value = arg[len("--config."):].partition("=")
        value = value if has_value else next(args, "")
        result += [f"--config.{name}.{key}={value}" for name in stages]
    return result


@reports_errors
def main(argv: Sequence[str]) -> int:
    from llama2_jax import config_cli

    parser = ArgumentParser(prog="python -m llama2_jax pipeline", description=__doc__)
    parser.add_argument("--config", metavar="FILE.py:SIZE", help="configs/pipeline.py:SIZE, then --config.KEY=VALUE")
    parser.add_argument("--workdir", required=True, help="every stage's subdirectory goes here; rerunning resumes")
    parser.add_argument("--dry-run", action="store_true", help="print every stage's command; run nothing")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        from llama2_jax import config_help

        config_help.print_config_help(argv)
        return 0
    spec, _, _ = config_cli.split_flags(argv, "config")
    if spec is None:
        raise UsageError("--config=configs/pipeline.py:SIZE is required")
    config = config_cli.load_config_file(spec)
    config, rest = config_cli.parse_overrides(config, every_stage_mesh(argv, config))
    if "config_files" not in config:
        from llama2_jax.errors import ConfigError

        raise ConfigError("that config is not a pipeline's; give --config=configs/pipeline.py:SIZE")
    args = parser.parse_args(rest)
    from llama2_jax.recipe import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run.run(config, args.workdir, dry_run=args.dry_run)
