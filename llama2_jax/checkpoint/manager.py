"""Training checkpoints: orbax, asynchronous, atomic, keep-last-K, restored into any mesh.

Layout of a workdir written by the training loop:

    workdir/
      config.json              the full run config (also inside every checkpoint)
      model_config.json        LlamaConfig.to_dict() plus the model's kind: enough to rebuild it
      tokenizer.model          a copy of the SentencePiece model the run used
      checkpoints/<step>/
        state/                 orbax PyTree {"step", "params", "opt_state"}; params is the model's
                               nnx.Param state as a nested dict (embedder.embedding, layers.…, and
                               the head: output.kernel, or score.kernel for a reward model)
        data/                  the data iterator's position, one JSON file per process
        config/                the run config (JSON)
      checkpoints_unreadable/<step>/
                               steps that could not be read back, moved out of orbax's sight

orbax writes each step into a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves at most a temporary directory, which is never read back.

A finished step whose files are damaged later (missing or corrupt files, unreadable metadata) is
skipped in favour of the step before it, by every process alike, and moved to
checkpoints_unreadable/: there it neither counts toward keep-last-K, nor stops training from saving
that step number again, nor gets deleted. A step that reads fine but does not fit the restore target
(the model or optimizer config changed since) is an error, never a reason to fall back.
llama2_jax/checkpoint/orbax_params.py reads `params` alone from the newest step for inference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama2_jax import storage
from llama2_jax.checkpoint import layout
from llama2_jax.model.llama import TRAINED_KINDS

CHECKPOINTS_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"
STATE_ITEM = "state"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
# What reading damaged or missing files raises: OSError from the file system, ValueError from
# tensorstore and from orbax's metadata (JSON) readers. Anything else is a bug or a resource
# problem, which an older step would not cure.
UNREADABLE_ERRORS = (OSError, ValueError)
MAX_REASON_CHARS = 240

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be restored: none is readable, or one does not fit the restore target."""


# An iterator state (a dict) with this key set is the same on every process: a checkpoint holding
# it resumes on any number of processes (data/row_batches.py's position is one).
SAME_ON_EVERY_PROCESS = "same_on_every_process"


class IteratorStateHandler(ocp.CheckpointHandler):
    """The data iterator's position (`get_state()`, JSON-serialisable), one file per process:
    each process reads its own shard of the data and resumes its own position, unless the position
    says it is SAME_ON_EVERY_PROCESS, which any number of processes can resume."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        _process_file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> Any:
        """This process's saved position."""
        path = _process_file(directory)
        if path.exists():
            return json.loads(path.read_text())
        written = sorted(directory.glob("process_*.json")) if directory.exists() else []
        if not written:
            raise FileNotFoundError(f"{path} is missing")
        state = json.loads(written[0].read_text())
        if isinstance(state, dict) and state.get(SAME_ON_EVERY_PROCESS):
            return state
        raise CheckpointError(
            f"{path} is missing: the checkpoint was written by a different number of processes "
            f"({', '.join(p.name for p in written)}), each at its own position in the data; resume with as "
            "many processes, or train on pre-tokenized data (data.tokenized_dir or data.pretokenize), "
            "whose position is the same for any number of processes"
        )

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
    """Reads this process's position; the caller sets it once every process has read its own."""


def checkpoint_dir(workdir: str) -> str:
    """The checkpoints' directory, absolute (orbax refuses relative paths); URLs stay as given."""
    return os.fspath(storage.as_path(workdir) / CHECKPOINTS_SUBDIR)


class CheckpointManager:
    """Saves and restores the train state, the data position and the config under `workdir`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.unreadable_directory = os.fspath(storage.as_path(workdir) / UNREADABLE_SUBDIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # A temporary directory left by a killed save is removed when training starts again.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM, CONFIG_ITEM)
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
                    DATA_ITEM: IteratorStateSave(data_iterator),
                    CONFIG_ITEM: ocp.args.JsonSave(dict(config)),
                }
            ),
            force=force,
        )

    def restore(
        self, abstract_state: Any, data_iterator: Any, step: int | None = None
    ) -> tuple[int, Any]:
        """Restore the given step, or the newest readable one, into `abstract_state` (a pytree of
        jax.ShapeDtypeStruct whose shardings say where each array goes: any mesh works) and
        move `data_iterator` to its saved position. Returns (step, state).

        Unreadable newer steps are skipped, one warning line each, and moved aside (see the module
        docstring); all processes restore the same step. Raises CheckpointError if no step can be
        read, or if the newest readable one does not fit `abstract_state`.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint step {step} in {self.directory}; it has {steps[::-1]}")
            steps = [step]
        unreadable: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                state, position = self._read(candidate, abstract_state)
                reason = None
            except UNREADABLE_ERRORS as error:
                reason = _one_line(error)
            if not _on_every_process(reason is None):
                unreadable.append((candidate, reason or "another process could not read it"))
                continue
            data_iterator.set_state(position)
            self._set_aside(unreadable, restored=candidate)
            return candidate, state
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {bad} ({reason})" for bad, reason in unreadable)
            + ". Nothing was moved or deleted: restore the files, or move these steps out of "
            f"{self.directory} to train from scratch"
        )

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """This process's share of the state and its data position at `step`. Storage failures
        propagate as UNREADABLE_ERRORS; a saved tree unlike the target is a CheckpointError,
        found from the metadata before any array is read."""
        step_directory = epath.Path(self.directory) / str(step)
        # The handlers, not orbax's manager, read the step: the manager ends a restore with a
        # barrier, where the other processes would wait forever for one whose read failed.
        handler = ocp.StandardCheckpointHandler()
        try:
            self._check_fits(step, handler.metadata(step_directory / STATE_ITEM), abstract_state)
            state = handler.restore(
                step_directory / STATE_ITEM, args=ocp.args.StandardRestore(abstract_state)
            )
        finally:
            handler.close()
        position = IteratorStateHandler().restore(
            step_directory / DATA_ITEM, args=IteratorStateRestore()
        )
        return state, position

    def _check_fits(self, step: int, metadata: Any, abstract_state: Any) -> None:
        saved = _shapes(metadata.tree)
        wanted = _shapes(abstract_state)
        problems = [
            f"{name} has shape {saved[name]} in the checkpoint but {shape} in the state to restore"
            for name, shape in wanted.items()
            if name in saved and saved[name] != shape
        ]
        problems += [f"{name} is not in the checkpoint" for name in wanted if name not in saved]
        problems += [
            f"{name} is in the checkpoint but not in the state to restore"
            for name in saved
            if name not in wanted
        ]
        if problems:
            more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
            run_config = storage.as_path(self.workdir) / "config.json"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit the train state: "
                f"{problems[0]}{more}. The model or optimizer config differs from the one it was "
                f"saved with: resume with that config ({run_config}) or train in a new workdir"
            )

    def _set_aside(self, unreadable: list[tuple[int, str]], restored: int) -> None:
        """Move unreadable steps to `unreadable_directory` (process 0; the others wait for it)."""
        if not unreadable:
            return
        moved = {}
        if jax.process_index() == 0:
            moved = {step: self._move_aside(step) for step, _ in unreadable}
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llama2_jax: unreadable checkpoints moved aside")
        self._manager.reload()
        for step, reason in unreadable:
            where = f"; moved it to {moved[step]}" if step in moved else ""
            log.warning(
                "checkpoint step %d in %s is unreadable (%s); restoring step %d%s",
                step, self.directory, reason, restored, where,
            )

    def _move_aside(self, step: int) -> epath.Path:
        destination = epath.Path(self.unreadable_directory) / str(step)
        copies = 0
        while destination.exists():  # the same step number went bad before: keep both
            copies += 1
            destination = destination.parent / f"{step}.{copies}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(self.directory) / str(step)).rename(destination)
        return destination

    def saved_config(self, step: int) -> dict[str, Any]:
        """The run config saved with `step`."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[CONFIG_ITEM])

    def wait(self) -> None:
        """Block until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted leaf path -> shape, with orbax's names for the paths (saved trees and targets alike)."""
    return {
        ".".join(path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in ocp.tree.to_flat_dict(tree).items()
    }


def _one_line(error: BaseException) -> str:
    """`ErrorType: first line of the message`, shortened: storage errors can embed whole specs."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process; a single process decides alone, with no collective."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def write_run_files(
    workdir: str,
    config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    tokenizer_path: str | None,
    model_kind: str = "llama",
    base: Mapping[str, str] | None = None,
) -> None:
    """Write config.json, model_config.json (the LlamaConfig fields plus `kind`, the model class's
    name in llama2_jax.model.llama.TRAINED_KINDS, and for a model with adapters `lora_base`, where
    its frozen base came from: train/lora_runs.py) and a copy of the tokenizer into `workdir`
    (process 0)."""
    if model_kind not in TRAINED_KINDS:
        raise ValueError(f"unknown model kind {model_kind!r}; known kinds: {sorted(TRAINED_KINDS)}")
    if jax.process_index() != 0:
        return
    directory = storage.as_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config)
    described = {**model_config, "kind": model_kind, **({"lora_base": base} if base else {})}
    _write_json(directory / "model_config.json", described)
    if tokenizer_path:
        destination = directory / "tokenizer.model"
        source = storage.as_path(tokenizer_path)
        if not (destination.exists() and storage.same_file(source, destination)):
            destination.write_bytes(source.read_bytes())


def _write_json(path: epath.Path, values: Mapping[str, Any]) -> None:
    storage.write_whole(path, json.dumps(dict(values), indent=2, sort_keys=True))
