"""Read and write `.safetensors` files without the safetensors package.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and `[begin, end)` byte range in the data section, then the raw little-endian bytes.
Reading memory-maps one tensor at a time; writing emits the header first (everything about the
tensors is known up front from their shapes) and then each tensor's bytes in order, so neither
direction ever holds more than one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from llama2_jax.checkpoint.lazy import ArrayLike, LazyArray, as_lazy

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header larger than this is a corrupt or hostile file, not a real checkpoint.
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed JSON header and the file offset where the data section starts."""
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (header_length,) = struct.unpack("<Q", length_bytes)
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: safetensors header claims {header_length} bytes; file is corrupt"
            )
        header_bytes = file.read(header_length)
    if len(header_bytes) != header_length:
        raise ValueError(f"{path}: safetensors header is truncated")
    try:
        header = json.loads(header_bytes)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({error})") from None
    return header, 8 + header_length


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[0].get("__metadata__", {}) or {}


def read_safetensors(path: str | os.PathLike) -> dict[str, LazyArray]:
    """Tensor name -> LazyArray that memory-maps just that tensor's bytes when loaded."""
    path = os.fspath(path)
    header, data_start = read_header(path)
    file_size = os.path.getsize(path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > file_size:
            raise ValueError(
                f"{path}: tensor {name} byte range [{begin}, {end}) does not fit {shape} {dtype} "
                f"in a file of {file_size} bytes; the file is truncated or corrupt"
            )
        tensors[name] = LazyArray(shape, dtype, _mapper(path, data_start + begin, dtype, shape))
    return tensors


def _mapper(path: str, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
    def produce() -> np.ndarray:
        if 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    return produce


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, ArrayLike],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors (arrays or LazyArrays, loaded one at a time) in the given order."""
    lazies = {name: as_lazy(t) for name, t in tensors.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in lazies.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * ((-len(header_bytes)) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for t in lazies.values():
            data = np.ascontiguousarray(t.load(), dtype=t.dtype)
            file.write(memoryview(data.reshape(-1).view(np.uint8)))
            del data
