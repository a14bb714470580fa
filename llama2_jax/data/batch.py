"""What a task's batch looks like: each field's shape per row and dtype (`BatchSpec`).

The data pipeline fills batches of a spec; the step builder, `aot` and `bench` build abstract or
synthetic batches from it; throughput counts the tokens of its model-input field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np

# Fields the packer adds to packed rows.
PACKED_FIELDS = ("positions", "segment_ids")
# What an encoder makes of an example: named arrays, per token when packed, a whole row when not.
Piece = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a batch: its shape per row, its dtype, and how a benchmark fills it
    (`tokens`: random ids, `positions`: 0, 1, ..., `ones`, `zeros`)."""

    shape: tuple[int, ...]
    dtype: str
    fill: str = "zeros"


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The batch a task trains on. `packed`: pieces are first-fit packed (and `positions` and
    `segment_ids` are added); otherwise each piece is a whole row. `weight_field` is what the loss
    counts (a batch whose weights are all 0 has nothing to train on); `model_inputs` is the field
    of token ids the model runs on, which throughput counts."""

    fields: Mapping[str, Field]
    packed: bool
    weight_field: str
    model_inputs: str = "inputs"

    def model_tokens_per_row(self) -> int:
        return math.prod(self.fields[self.model_inputs].shape)

    def abstract(self, global_batch_size: int, where: jax.sharding.Sharding | None = None) -> dict:
        """One global batch as shapes, for compiling ahead of time."""
        return {name: jax.ShapeDtypeStruct((global_batch_size, *field.shape), field.dtype, sharding=where)
                for name, field in self.fields.items()}

    def synthetic(self, global_batch_size: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """A batch of random tokens, every row one full sequence: a benchmark's workload."""
        rng = np.random.default_rng(seed)
        batch = {}
        for name, field in self.fields.items():
            shape = (global_batch_size, *field.shape)
            if field.fill == "tokens":
                batch[name] = rng.integers(3, vocab_size, shape)
            elif field.fill == "positions":
                batch[name] = np.broadcast_to(np.arange(shape[-1]), shape)
            else:
                batch[name] = np.full(shape, 1 if field.fill == "ones" else 0)
            batch[name] = np.ascontiguousarray(batch[name], field.dtype)
        return batch

    def empty_rows(self, rows: int) -> dict[str, np.ndarray]:
        """Rows of padding: zeros everywhere, so weight 0 and segment id 0."""
        return {name: np.zeros((rows, *field.shape), field.dtype) for name, field in self.fields.items()}


def packed_spec(seq_len: int, per_token: Mapping[str, str], weight_field: str) -> BatchSpec:
    """The spec of packed rows of `seq_len` holding `per_token` fields (name -> dtype), plus the
    positions and segment ids packing adds."""
    fields = {name: Field((seq_len,), dtype, "tokens" if dtype == "int32" else "ones")
              for name, dtype in per_token.items()}
    fields["positions"] = Field((seq_len,), "int32", "positions")
    fields["segment_ids"] = Field((seq_len,), "int32", "ones")
    return BatchSpec(fields, packed=True, weight_field=weight_field)
