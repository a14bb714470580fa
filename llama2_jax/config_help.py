"""What each key of a config means, for `--help --config=FILE.py:SIZE`: the shared sections'
documentation (llama2_jax/train/config.py), a stage's own (its module's CONFIG_DOCS), and a
pipeline's (llama2_jax/recipe/steps.py: its own keys, and each stage section's as that stage says).
Apart from the parsing (config_cli.py), which the pipeline's steps use in turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from llama2_jax import stages
from llama2_jax.config_cli import flat_keys, parse_config_flags
from llama2_jax.recipe import steps
from llama2_jax.train.config import KEY_DOCS


def key_docs(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What each key of `config` means: the shared sections' docs and its stage's own (a pipeline's
    config: llama2_jax/recipe/steps.py says)."""
    if "stage" not in config and "config_files" in config:
        return pipeline_docs(config)
    return {**KEY_DOCS, **stages.stage_module(config.stage).CONFIG_DOCS}


def describe(config: ml_collections.ConfigDict) -> str:
    """Every key with its value and its meaning, grouped by section."""
    docs = key_docs(config)
    lines = []
    for key in flat_keys(config):
        section, _, name = key.rpartition(".")
        value = config
        for part in key.split("."):
            value = value[part]
        if section and (not lines or lines[-1][0] != section):
            lines.append((section, None, None))
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        lines.append((section, f"{'  ' if section else ''}{name} = {shown}", docs.get(key, "")))
    width = max(len(text) for _, text, _ in lines if text)
    return "\n".join(f"{section}" if text is None else f"  {text:<{width}}  {doc}".rstrip()
                     for section, text, doc in lines)


def print_config_help(argv: Sequence[str]) -> None:
    """With --config among `argv`, print that config's keys (overrides applied) after the help."""
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        print("\nadd --config=FILE.py:SIZE to --help to list that config's keys, values and meanings")
        return
    config, _ = parse_config_flags([arg for arg in argv if arg not in ("-h", "--help")])
    print(f"\nconfig keys (override any with --config.SECTION.KEY=VALUE):\n{describe(config)}")


def pipeline_docs(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What each key of a pipeline's config means: its own keys, and each stage section's keys as
    that stage documents them."""
    docs = {}
    for key in flat_keys(config):
        section, _, rest = key.partition(".")
        if isinstance(config.get(section), ml_collections.ConfigDict) and "stage" in config[section]:
            docs[key] = key_docs(config[section]).get(rest, "")
        else:
            docs[key] = steps.COMMAND_DOCS.get(key) or steps.COMMAND_DOCS.get(f"{section}.*", "")
    return docs
