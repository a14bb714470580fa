"""What a rejection-sampling workdir keeps. Every file is written whole (llama2_jax/storage.py), so
a resumed run finds each phase's output either complete or absent, and never redoes finished work.

    WORKDIR/round_N/samples/part_NNNNN.json   one part of the sampling: each answer's token ids, its seconds
    WORKDIR/round_N/candidates.jsonl          every answer of round N, its scores and whether it was kept
    WORKDIR/round_N/held_out.jsonl            the held-out prompts answered after round N (round_0: before)
    WORKDIR/round_N/phases.json               seconds spent in each phase of round N
    WORKDIR/round_N/checkpoints/, ...         round N's fine-tuning, a training workdir of its own
    WORKDIR/pool.jsonl                        the best answer per prompt over the rounds scored so far
    WORKDIR/state/, model_config.json, tokenizer.model, policy.json
                                              the newest policy (llama2_jax/rollout/files.py), read by
                                              load_pretrained; policy.json names its round

Only process 0 writes; every process of a run computes the same values, so none reads back what
another wrote during the run.
"""

from __future__ import annotations

import os

import jax
from etils import epath

from llama2_jax import storage
from llama2_jax.rollout.files import exported_policy, read_json, write_json

POOL_FILE = "pool.jsonl"
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
    exported = exported_policy(workdir)
    return exported["round"] if exported else None
