"""What a run that trains adapters records of its frozen base, and the check a resumed run makes.

The checkpoints of such a run hold the adapters (and a reward model's score head) with their
optimizer state, never the base: `model_config.json` names where the base came from (the run's
`init_checkpoint`) and a fingerprint of the base's weights as the run loaded them, so that a resumed
run, `load_pretrained` and `convert` read the base again and know it is the same one.

The fingerprint is exact on any mesh: per tensor, two wrapping 32-bit sums of the weights' bit
patterns, one plain and one weighted by position. Integer addition is associative, so every
sharding and reduction order gives the same numbers, where a float checksum would not.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llama2_jax import storage

BASE_KEY = "lora_base"  # in model_config.json: {"path", "fingerprint"}


def fingerprint(frozen: Any) -> str:
    """A short hex digest of the frozen parameters' values, dtypes and shapes."""
    flat, _ = jax.tree_util.tree_flatten_with_path(frozen)
    sums = jax.device_get(jax.jit(lambda leaves: [_bit_sums(leaf) for leaf in leaves])([leaf for _, leaf in flat]))
    digest = hashlib.sha256()
    for (path, leaf), checksums in zip(flat, sums):
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        digest.update(np.asarray(checksums, np.uint32).tobytes())
    return digest.hexdigest()[:16]


def _bit_sums(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jnp.integer) and jnp.iinfo(leaf.dtype).bits < 8:  # int4: no bitcast
        leaf = leaf.astype(jnp.int8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[leaf.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(leaf, unsigned).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def base_record(config: ml_collections.ConfigDict, frozen: Any, workdir: str, resuming: bool) -> dict[str, str]:
    """The base's record for `model_config.json`; a resumed run's base must be the one it started
    from, or the run stops with one line naming both."""
    source = config.get("init_checkpoint", "")
    record = {"path": source if storage.is_url(source) or not source else os.path.abspath(source),
              "fingerprint": fingerprint(frozen)}
    if resuming:
        saved = saved_record(workdir)
        if saved is not None and saved["fingerprint"] != record["fingerprint"]:
            raise ValueError(
                f"the base model at {config.init_checkpoint} (fingerprint {record['fingerprint']}) is not the one "
                f"the adapters in {workdir} were trained on ({saved['path']}, fingerprint {saved['fingerprint']}); "
                "set --config.init_checkpoint to that base, or train in a new workdir")
    return record


def saved_record(directory: str | os.PathLike) -> dict[str, str] | None:
    """The base record in a workdir's model_config.json, if its model has adapters."""
    path = storage.as_path(directory) / "model_config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(BASE_KEY)
