"""What a rejection-sampling workdir keeps. Every file is written whole (llama2_jax/storage.py), so
a resumed run finds each phase's output either complete or absent, and never redoes finished work.

    WORKDIR/round_N/samples/part_NNNNN.json   one sampling batch: each answer's token ids, its seconds
    WORKDIR/round_N/candidates.jsonl          every answer of round N, its scores and whether it was kept
    WORKDIR/round_N/held_out.jsonl            the held-out prompts answered after round N (round_0: before)
    WORKDIR/round_N/phases.json               seconds spent in each phase of round N
    WORKDIR/round_N/checkpoints/, ...         round N's fine-tuning, a training workdir of its own
    WORKDIR/pool.jsonl                        the best answer per prompt over the rounds scored so far
    WORKDIR/state/, model_config.json, tokenizer.model, policy.json
                                              the newest policy's parameters, read by load_pretrained

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

POOL_FILE = "pool.jsonl"
POLICY_FILE = "policy.json"  # which round's policy state/ holds, written once it is complete
CANDIDATE_FIELDS = ("prompt", "sample", "answer", "finished", "helpfulness", "safety", "combined", "kept")


def round_dir(workdir: str | os.PathLike, round_number: int) -> epath.Path:
    return storage.as_path(workdir) / f"round_{round_number}"


def part_path(workdir: str | os.PathLike, round_number: int, part: int) -> epath.Path:
    return round_dir(workdir, round_number) / "samples" / f"part_{part:05d}.json"


def candidates_path(workdir: str | os.PathLike, round_number: int) -> epath.Path:
    return round_dir(workdir, round_number) / "candidates.jsonl"


def held_out_path(workdir: str | os.PathLike, round_number: int) -> epath.Path:
    return round_dir(workdir, round_number) / "held_out.jsonl"


def phases_path(workdir: str | os.PathLike, round_number: int) -> epath.Path:
    return round_dir(workdir, round_number) / "phases.json"


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


def read_phases(workdir: str | os.PathLike, round_number: int) -> dict[str, float]:
    """Seconds spent in each phase of a round so far."""
    path = phases_path(workdir, round_number)
    return read_json(path, f"round {round_number}'s phase times") if path.exists() else {}


def set_phase_seconds(workdir: str | os.PathLike, round_number: int, phase: str, seconds: float,
                      add: bool = False) -> None:
    """Records a phase's seconds (`add`: to those earlier runs spent in it, for a phase that resumes
    where it stopped)."""
    if jax.process_index() == 0:
        phases = read_phases(workdir, round_number)
        write_json(phases_path(workdir, round_number),
                   {**phases, phase: seconds + (phases.get(phase, 0.0) if add else 0.0)})


def exported_round(workdir: str | os.PathLike) -> int | None:
    """The round whose policy the workdir's own checkpoint holds (None: none yet)."""
    path = storage.as_path(workdir) / POLICY_FILE
    return read_json(path, "the exported policy's round")["round"] if path.exists() else None


def export_policy(workdir: str | os.PathLike, round_number: int, model, tokenizer_path: str | os.PathLike) -> None:
    """The policy (its adapters merged, if it trained some) as the workdir's own checkpoint (`state/`,
    `model_config.json`, `tokenizer.model`), replacing the previous round's; `policy.json` names the
    round once the parameters are complete."""
    model = lora.merged(model, model.config.param_dtype)  # adapters merged: a model like any other
    directory = storage.as_path(workdir)
    if jax.process_index() == 0:
        (directory / POLICY_FILE).unlink(missing_ok=True)
        if (directory / STATE_DIR).exists():
            (directory / STATE_DIR).rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rejection: old policy removed")
    save_params(directory, model.config, model_arrays(model))  # every process writes its shards
    if jax.process_index() == 0:
        (directory / TOKENIZER_FILE).write_bytes(storage.as_path(tokenizer_path).read_bytes())
    write_json(directory / POLICY_FILE, {"round": round_number})
