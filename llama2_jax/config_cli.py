"""`--config=configs/pretrain.py:tiny --config.optimizer.peak_lr=3e-4` without absl.

The config file is a Python module with `get_config(arg)` returning an ml_collections ConfigDict;
`path.py:arg` passes `arg`. Each `--config.a.b=value` (or `--config.a.b value`) then sets one
existing key, parsed to that key's type; a key that takes several values also takes one alone
(`--config.data.paths=file.jsonl` for `"('file.jsonl',)"`). The ConfigDict is locked afterwards,
and an unknown key is an error that names it and the closest valid keys. What each key means is
llama2_jax/config_help.py's.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from llama2_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> the file's `get_config(arg)` (or `get_config()` without arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (from --config={spec})")
    module_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` as a dotted path."""
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    valid = flat_keys(config)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def _parse_value(text: str, current: Any, key: str, declared: type = type(None)) -> Any:
    """Parse `text` to the type of the key's current value, or for a key left None (a model key that
    a checkpoint fills, say) to the type it is declared with."""
    if current is None and declared in (int, float):
        current = declared(0)
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        if isinstance(current, tuple) and all(isinstance(item, str) for item in current):
            return (text,)  # one bare string where a key takes several (data.paths=file.jsonl)
        example = repr(current) if isinstance(current, tuple) else ""
        syntax = f"; write it as a Python tuple in quotes, e.g. --config.{key}=\"{example}\"" if example else ""
        raise ConfigError(
            f"--config.{key}: cannot parse {text!r} as {type(current).__name__}{syntax}"
        ) from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        return (value,)  # one value where a key takes several (rejection.temperature=1.2)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(
            f"--config.{key}: expected {type(current).__name__}, got {text!r}"
        )
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set the existing dotted `key` of `config` from its command-line text."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown_key_error(config, key)
        node = child
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise _unknown_key_error(config, key)
    with node.ignore_type():
        node[leaf] = _parse_value(text, node[leaf], key, node.get_type(leaf))


def split_flags(argv: Sequence[str], flag: str) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(`--config` value, [(key, value) of `--config.key`], the other arguments)."""
    spec = None
    overrides: list[tuple[str, str]] = []
    rest: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        name, has_value, value = arg.partition("=")
        if name == f"--{flag}" or name.startswith(f"--{flag}."):
            if not has_value:
                if index >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                value = args[index]
                index += 1
            if name == f"--{flag}":
                spec = value
            else:
                overrides.append((name[len(f"--{flag}.") :], value))
        else:
            rest.append(arg)
    return spec, overrides, rest


def parse_overrides(
    config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = "config"
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Apply the `--config.a.b=v` flags among `argv` to `config`, lock it, return the other arguments."""
    _, overrides, rest = split_flags(argv, flag)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config, rest


def parse_config_flags(
    argv: Sequence[str], flag: str = "config"
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Split `argv` into the config (file + overrides, locked) and the remaining arguments."""
    spec, _, _ = split_flags(argv, flag)
    if spec is None:
        raise ConfigError(f"--{flag}=path/to/config.py[:arg] is required")
    return parse_overrides(load_config_file(spec), argv, flag)
