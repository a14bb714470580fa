"""Training checkpoints: orbax, asynchronous, atomic, keep-last-K, restored into any mesh.

Layout of a workdir written by the training loop:

    workdir/
      config.json              the full run config (also inside every checkpoint)
      model_config.json        LlamaConfig.to_dict(): enough to rebuild the model
      tokenizer.model          a copy of the SentencePiece model the run used
      checkpoints/<step>/
        state/                 orbax PyTree {"step", "params", "opt_state"}; params is the model's
                               nnx.Param state as a nested dict (embedder.embedding, layers.…, output.kernel)
        data/                  the data iterator's position, one JSON file per process
        config/                the run config (JSON)

orbax writes each step into a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves at most a temporary directory, which is never read back. A step whose
files are damaged later is reported by name and skipped in favour of the step before it.
llama2_jax/checkpoint/orbax_params.py reads `params` alone from the newest step for inference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS_SUBDIR = "checkpoints"
STATE_ITEM = "state"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be read."""


class IteratorStateHandler(ocp.CheckpointHandler):
    """The data iterator's position (`get_state()`, JSON-serialisable), one file per process:
    each process reads its own shard of the data and resumes its own position."""

    def save(self, directory: epath.Path, args: "IteratorStateSave") -> None:
        _process_file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "IteratorStateRestore") -> Any:
        path = _process_file(directory)
        if not path.exists():
            raise CheckpointError(
                f"{path} is missing: the checkpoint was written by a different number of processes"
            )
        args.iterator.set_state(json.loads(path.read_text()))
        return args.iterator

    def metadata(self, directory: epath.Path) -> None:
        return None


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
class IteratorStateSave(ocp.args.CheckpointArgs):
    """The state is read when the save is requested, not when the background write runs,
    because the loop keeps drawing batches meanwhile."""

    def __init__(self, iterator: Any):
        self.state = iterator.get_state()


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
class IteratorStateRestore(ocp.args.CheckpointArgs):
    def __init__(self, iterator: Any):
        self.iterator = iterator


def checkpoint_dir(workdir: str) -> str:
    """The checkpoints' directory, absolute (orbax refuses relative paths); URLs stay as given."""
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)
    return os.path.join(workdir, CHECKPOINTS_SUBDIR)


class CheckpointManager:
    """Saves and restores the train state, the data position and the config under `workdir`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # A temporary directory left by a killed save is removed when training starts again.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, "data", "config")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        config: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start saving `state` (any pytree of jax.Arrays) and the iterator position; returns at
        once while the arrays are written in the background (unless async saving is off)."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    "data": IteratorStateSave(data_iterator),
                    "config": ocp.args.JsonSave(dict(config)),
                }
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> tuple[int, Any]:
        """Restore the given step, or the newest readable one, into `abstract_state` (a pytree of
        jax.ShapeDtypeStruct whose shardings say where each array goes: any mesh works) and
        move `data_iterator` to its saved position. Returns (step, state).

        A damaged newest step is skipped with a warning naming it; if no step can be read, raises
        CheckpointError listing every failure."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures = []
        for candidate in steps:
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        **{
                            STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                            "data": IteratorStateRestore(data_iterator),
                        }
                    ),
                )
            except Exception as error:  # orbax raises many types for unreadable files
                path = os.path.join(self.directory, str(candidate))
                failures.append(f"{path}: {type(error).__name__}: {error}")
                log.warning("checkpoint %s cannot be read (%s: %s)", path, type(error).__name__, error)
                continue
            if failures:
                skipped = [s for s in steps if s > candidate]
                log.warning("restoring step %d: newer checkpoint(s) %s could not be read", candidate, skipped)
            return candidate, restored[STATE_ITEM]
        raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(failures))

    def wait(self) -> None:
        """Block until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def write_run_files(
    workdir: str,
    config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    tokenizer_path: str | None,
) -> None:
    """Write config.json, model_config.json and a copy of the tokenizer into `workdir` (process 0)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config)
    _write_json(directory / "model_config.json", model_config)
    if tokenizer_path:
        destination = directory / "tokenizer.model"
        source = epath.Path(tokenizer_path)
        if not (destination.exists() and os.path.samefile(source, destination)):
            destination.write_bytes(source.read_bytes())


def _write_json(path: epath.Path, values: Mapping[str, Any]) -> None:
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_text(json.dumps(dict(values), indent=2, sort_keys=True))
    temporary.replace(path)
