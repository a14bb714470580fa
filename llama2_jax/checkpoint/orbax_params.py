"""Our own checkpoints: orbax trees of the model's params plus the config that shaped them.

Two layouts are read. The one `convert --to orbax` writes:

    model_config.json   LlamaConfig.to_dict() (param and compute dtype included) plus "kind",
                        the model class's name in llama2_jax.model.llama.MODEL_KINDS
                        (a file without it is a language model, "llama")
    state/              orbax tree {"params": the `nnx.state(model, nnx.Param)` pure dict}, e.g.
                        params["layers"]["attention"]["wq"] is [L, dim, heads, head_dim]

and a training workdir (checkpoint/manager.py): the same `model_config.json` beside
`checkpoints/<step>/state/`, whose tree holds "params" next to the optimizer state; the newest step
is read. Either way only "params" is restored, each array straight into its shards on the mesh.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama2_jax import storage
from llama2_jax.checkpoint import layout
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.checkpoint.manager import CHECKPOINTS_SUBDIR, STATE_ITEM
from llama2_jax.model.config import LlamaConfig

CONFIG_FILE = "model_config.json"
KIND_KEY = "kind"
BASE_KEY = "lora_base"  # train/lora_runs.py writes it
STATE_DIR = "state"
PARAMS_KEY = "params"


class _WithoutMissingStepMetadata(logging.Filter):
    """Reading one item of a training checkpoint (`checkpoints/<step>/state`) on its own, orbax looks
    for the step's metadata file inside the item, where the manager never writes it, and warns on
    every load; nothing is wrong, so that one warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_WithoutMissingStepMetadata())


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    directory = storage.as_path(path)
    return (directory / CONFIG_FILE).is_file() and (
        (directory / STATE_DIR).is_dir() or (directory / CHECKPOINTS_SUBDIR).is_dir()
    )


def read_config(path: str | os.PathLike, **overrides: Any) -> tuple[LlamaConfig, str]:
    """The model's config and kind from `model_config.json`."""
    fields = json.loads((storage.as_path(path) / CONFIG_FILE).read_text())
    kind = fields.pop(KIND_KEY, "llama")
    fields.pop(BASE_KEY, None)  # a run with adapters: where its base is (read_base_record)
    if kind == "actor_critic":
        raise ValueError(f"{path} is a PPO run's training workdir (policy and value model trained together); load "
                         "the PPO workdir above it, which holds the trained policy")
    layout.check_kind(kind)
    return LlamaConfig.from_dict({**fields, **overrides}), kind


def read_base_record(path: str | os.PathLike) -> dict[str, str] | None:
    """Where the frozen base of a run with adapters is, and its fingerprint (train/lora_runs.py)."""
    return json.loads((storage.as_path(path) / CONFIG_FILE).read_text()).get(BASE_KEY)


def restore_subset(path: str, abstract: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The parameters `abstract` names (dotted names -> shapes with shardings and dtypes), restored
    into their shards; the checkpoint may hold others, which stay unread."""
    saved = saved_shapes(path)
    problems = [f"{key} is not in it" if key not in saved else f"{key} has shape {saved[key]}, not {want.shape}"
                for key, want in abstract.items() if saved.get(key) != tuple(want.shape)]
    if problems:
        raise ValueError(f"{path} does not hold the trained parameters its model_config.json describes: "
                         + "; ".join(problems[:3]))
    restore_args = nest({key: ocp.ArrayRestoreArgs(sharding=want.sharding, dtype=want.dtype)
                         for key, want in abstract.items()})
    return _restore_params(path, restore_args, nest(dict(abstract)))


def restore_adapters(path: str) -> dict[str, np.ndarray]:
    """The low-rank adapters a training checkpoint holds, as host arrays by dotted name."""
    keys = [key for key in saved_shapes(path) if "_lora." in key]
    return _restore_params(path, nest({key: ocp.RestoreArgs(restore_type=np.ndarray) for key in keys}))


def write_config(path: str | os.PathLike, config: LlamaConfig, kind: str) -> None:
    (storage.as_path(path) / CONFIG_FILE).write_text(json.dumps({**config.to_dict(), KIND_KEY: kind}, indent=2))


def state_path(path: str | os.PathLike) -> str:
    """The orbax directory holding the params: ours directly, or a train workdir's newest step.

    orbax writes a step under a temporary name and renames it to the bare step number once every
    item is complete, so numbered directories are exactly the finished steps.
    """
    directory = storage.as_path(path)
    if (directory / STATE_DIR).is_dir():
        return os.fspath(directory / STATE_DIR)
    steps_dir = directory / CHECKPOINTS_SUBDIR
    steps = [int(entry.name) for entry in steps_dir.iterdir() if entry.name.isdigit()]
    steps = [step for step in steps if (steps_dir / str(step) / STATE_ITEM).is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"training workdir {directory} has no finished checkpoint in {steps_dir}"
        )
    return os.fspath(steps_dir / str(max(steps)) / STATE_ITEM)


def nest(flat: Mapping[str, Any]) -> dict:
    """{"layers.attention.wq": x} -> {"layers": {"attention": {"wq": x}}}."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_tree(
    config: LlamaConfig, kind: str, params_path: str, found: Mapping[str, tuple[int, ...]]
) -> None:
    """One clear error if the saved tree is not this config's model of this kind."""
    expected = layout.stacked_shapes(config, kind)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(
            f"{params_path}: parameters {missing} of a {kind} model are missing (it holds "
            f"{sorted(set(found) - set(expected)) or 'nothing else'}); check {CONFIG_FILE}'s "
            f"{KIND_KEY!r} and shape fields"
        )
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise ValueError(
                f"{params_path}: parameter {key} has shape {tuple(found[key])} but the config needs {shape}"
            )


def saved_shapes(path: str) -> dict[str, tuple[int, ...]]:
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if PARAMS_KEY not in tree:
        raise ValueError(f"{path}: no {PARAMS_KEY!r} in the checkpoint (found {sorted(tree)})")
    return {key: tuple(meta.shape) for key, meta in flatten(tree[PARAMS_KEY]).items()}


def _restore_params(path: str, restore_args: dict, item: dict | None = None) -> dict:
    restored = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            item={PARAMS_KEY: item or restore_args},
            restore_args={PARAMS_KEY: restore_args},
            partial_restore=True,
        ),
    )
    return flatten(restored[PARAMS_KEY])


def restore_numpy(path: str, config: LlamaConfig, kind: str) -> dict[str, np.ndarray]:
    """Every parameter as a host numpy array (dotted stacked names), shapes checked against the config."""
    check_tree(config, kind, path, saved_shapes(path))
    return _restore_params(
        path,
        nest(
            {
                key: ocp.RestoreArgs(restore_type=np.ndarray)
                for key in layout.stacked_shapes(config, kind)
            }
        ),
    )


def restore_sharded(
    path: str,
    config: LlamaConfig,
    kind: str,
    shardings: Mapping[str, jax.sharding.Sharding],
    dtype,
) -> dict[str, jax.Array]:
    """Every parameter restored directly into its shards on the mesh, cast to `dtype`."""
    check_tree(config, kind, path, saved_shapes(path))
    shapes = layout.stacked_shapes(config, kind)
    restore_args = nest(
        {key: ocp.ArrayRestoreArgs(sharding=shardings[key], dtype=dtype) for key in shapes}
    )
    item = nest(
        {
            key: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[key])
            for key, shape in shapes.items()
        }
    )
    return _restore_params(path, restore_args, item)


def read_orbax_params(
    path: str | os.PathLike, **config_overrides: Any
) -> tuple[LlamaConfig, dict[str, LazyArray]]:
    """Config and per-layer tensors (views into the restored host arrays)."""
    config, kind = read_config(path, **config_overrides)
    arrays = restore_numpy(state_path(path), config, kind)
    return config, layout.unstack_layers(config, arrays)


def save_params(path: str | os.PathLike, config: LlamaConfig, arrays: Mapping[str, Any]) -> None:
    """Save params (dotted stacked names -> numpy or jax arrays) and their config in our layout;
    the kind is the model's whose head `arrays` hold."""
    directory = storage.as_path(path)
    kind = layout.kind_of(arrays)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / STATE_DIR, {PARAMS_KEY: nest(dict(arrays))})
    checkpointer.wait_until_finished()
    write_config(path, config, kind)


def write_orbax_params(
    path: str | os.PathLike, config: LlamaConfig, tensors: Mapping[str, LazyArray]
) -> None:
    """Stack per-layer tensors into our tree (one parameter at a time) and save it with orbax.

    Each stacked array moves into a host-CPU jax.Array as soon as it is built: orbax saves jax
    arrays without copying them again, whereas it would copy numpy ones, doubling the peak.
    """
    host = jax.devices("cpu")[0]
    arrays = {}
    for key, lazy in layout.stack_layers(config, tensors).items():
        arrays[key] = jax.device_put(lazy.load(), host)
    param_dtype = str(np.dtype(arrays["embedder.embedding"].dtype))
    save_params(path, config.replace(param_dtype=param_dtype), arrays)
