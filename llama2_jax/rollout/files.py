"""What a stage writes, each file whole (llama2_jax/storage.py), so that a resumed run finds each
output either complete or absent and never redoes finished work.

    write_json / write_jsonl / read_json / read_jsonl   records, read back with one clear error
    export_policy(workdir, model, tokenizer_path, trained=...)
        the policy as the workdir's own checkpoint: WORKDIR/state/, model_config.json,
        tokenizer.model and policy.json (what it is, written once the parameters are complete),
        which `load_pretrained`, `chat`, `eval`, `convert` and a later stage read

Only process 0 writes; every process of a run computes the same values, so none reads back what
another wrote during the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from llama2_jax import storage
from llama2_jax.checkpoint.load import TOKENIZER_FILE
from llama2_jax.checkpoint.orbax_params import STATE_DIR, save_params
from llama2_jax.model import lora
from llama2_jax.sharding import model_arrays

POLICY_FILE = "policy.json"  # what state/ holds (the round or step that trained it), written once it is complete


def write_json(path: epath.Path, value: Any) -> None:
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_whole(path, json.dumps(value))


def write_jsonl(path: epath.Path, records: Iterable[Mapping[str, Any]]) -> None:
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_whole(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_json(path: epath.Path, holds: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise unreadable(path, holds, error) from None


def read_jsonl(path: epath.Path, holds: str, fields: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The records of a JSONL file this stage wrote, each holding `fields`; an unreadable file is one
    error naming it and what to do, and nothing is removed."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        missing = [field for record in records for field in fields if field not in record]
        if missing:
            raise ValueError(f"a record lacks {missing[0]!r}")
    except (OSError, ValueError) as error:
        raise unreadable(path, holds, error) from None
    return records


def unreadable(path: epath.Path, holds: str, error: Exception) -> ValueError:
    return ValueError(f"{path} cannot be read ({error}); it holds {holds}: move it aside and rerun to redo "
                      "that work")


def exported_policy(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """What `export_policy` last wrote as `trained` in the workdir (None: no policy yet)."""
    path = storage.as_path(workdir) / POLICY_FILE
    return read_json(path, "what the exported policy is") if path.exists() else None


def export_policy(workdir: str | os.PathLike, model, tokenizer_path: str | os.PathLike, *,
                  trained: Mapping[str, int]) -> None:
    """The policy (its adapters merged, if it trained some) as the workdir's own checkpoint (`state/`,
    `model_config.json`, `tokenizer.model`), replacing the one there; `policy.json` holds `trained`
    (e.g. {"round": 2} or {"step": 40}) once the parameters are complete."""
    model = lora.merged(model, model.config.param_dtype)  # adapters merged: a model like any other
    directory = storage.as_path(workdir)
    if jax.process_index() == 0:
        (directory / POLICY_FILE).unlink(missing_ok=True)
        if (directory / STATE_DIR).exists():
            (directory / STATE_DIR).rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("export: old policy removed")
    save_params(directory, model.config, model_arrays(model))  # every process writes its shards
    if jax.process_index() == 0:
        (directory / TOKENIZER_FILE).write_bytes(storage.as_path(tokenizer_path).read_bytes())
    write_json(directory / POLICY_FILE, dict(trained))
