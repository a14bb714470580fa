"""Read and write PyTorch `.pth` files (`torch.save` zip format) without PyTorch.

A `.pth` is a zip archive: `<prefix>/data.pkl` is a pickle of the state dict in which every tensor
is a call to `torch._utils._rebuild_tensor_v2` over a *storage*, referenced by a persistent id
`('storage', StorageType, key, location, numel)`; the storage's raw little-endian bytes are the
member `<prefix>/data/<key>`. torch writes those members uncompressed, so each can be memory-mapped
straight out of the zip and a tensor costs nothing until it is read.

The unpickler resolves only the handful of globals a state dict needs; anything else in the
pickle (arbitrary code, in a hostile file) is refused.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

from llama2_jax.checkpoint.lazy import ArrayLike, LazyArray, as_lazy

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """One `data/<key>` member: where its bytes start in the file and how many elements it holds."""

    def __init__(self, path: str, data_offset: int | None, archive_member: str, dtype, numel: int):
        self.path, self.data_offset, self.archive_member = path, data_offset, archive_member
        self.dtype, self.numel = dtype, numel

    def read(self) -> np.ndarray:
        if self.numel == 0:  # an empty file region cannot be mapped
            return np.zeros(0, self.dtype)
        if self.data_offset is not None:
            return np.memmap(
                self.path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=(self.numel,)
            )
        with zipfile.ZipFile(self.path) as archive:  # a compressed member cannot be mapped
            return np.frombuffer(
                archive.read(self.archive_member), dtype=self.dtype, count=self.numel
            )


def _rebuild_tensor(storage: _Storage, storage_offset, size, stride, *_unused) -> LazyArray:
    size, stride = tuple(size), tuple(stride)
    itemsize = storage.dtype.itemsize

    def produce() -> np.ndarray:
        flat = storage.read()
        return np.lib.stride_tricks.as_strided(
            flat[storage_offset:],
            shape=size,
            strides=[s * itemsize for s in stride],
            writeable=False,
        )

    return LazyArray(size, storage.dtype, produce)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_unused):
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


def _data_offset(file: io.BufferedReader, info: zipfile.ZipInfo) -> int | None:
    """Byte offset of a stored (uncompressed) member's data, read from its local file header."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    file.seek(info.header_offset)
    header = file.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"corrupt zip local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def read_pth(path: str | os.PathLike) -> dict[str, LazyArray]:
    """Lazily read a `torch.save` state dict: tensor name -> LazyArray (float32/16, bfloat16, ints)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip-format torch checkpoint (torch.save from torch >= 1.6)"
        )
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        members = {info.filename: info for info in archive.infolist()}
        pickle_names = [
            name for name in members if name.endswith("/data.pkl") and name.count("/") == 1
        ]
        if len(pickle_names) != 1:
            raise ValueError(
                f"{path}: expected one <prefix>/data.pkl in the archive, found {pickle_names}"
            )
        prefix = pickle_names[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            kind, storage_type, key, _location, numel = pid
            if kind != "storage" or not isinstance(storage_type, _StorageType):
                raise pickle.UnpicklingError(f"{path}: unsupported persistent id {pid!r}")
            if key not in storages:
                member = f"{prefix}data/{key}"
                if member not in members:
                    raise ValueError(f"{path}: storage {member} is missing from the archive")
                offset = _data_offset(raw, members[member])
                storages[key] = _Storage(path, offset, member, storage_type.dtype, numel)
            return storages[key]

        class RestrictedUnpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise pickle.UnpicklingError(f"{path}: refusing to load global {module}.{name}")
                return _ALLOWED_GLOBALS[module, name]

        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickle_names[0])))
        unpickler.persistent_load = persistent_load
        state = unpickler.load()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


# ---- writing -------------------------------------------------------------------------------------
# The pickle is emitted opcode by opcode (protocol 2) because the globals it must name live in
# torch, which is not importable here; the result has the structure torch.save writes for a
# dict of contiguous tensors, each with its own storage, and torch.load(weights_only=True) accepts it.


def _pickle_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + struct.pack("<B", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + struct.pack("<B", len(encoded)) + encoded


def _pickle_str(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _pickle_tensor(key: str, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    numel = int(np.prod(shape, dtype=np.int64))
    strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
    storage_id = (
        _pickle_tuple(
            [
                _pickle_str("storage"),
                f"ctorch\n{STORAGE_NAMES[dtype]}\n".encode(),
                _pickle_str(key),
                _pickle_str("cpu"),
                _pickle_int(numel),
            ]
        )
        + b"Q"
    )
    empty_hooks = b"ccollections\nOrderedDict\n)R"
    arguments = _pickle_tuple(
        [
            storage_id,
            _pickle_int(0),
            _pickle_tuple([_pickle_int(n) for n in shape]),
            _pickle_tuple([_pickle_int(n) for n in strides]),
            b"\x89",
            empty_hooks,
        ]
    )
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + arguments + b"R"


def _state_dict_pickle(tensors: Mapping[str, LazyArray]) -> bytes:
    body = b"".join(
        _pickle_str(name) + _pickle_tensor(str(key), t.shape, t.dtype)
        for key, (name, t) in enumerate(tensors.items())
    )
    return b"\x80\x02}(" + body + b"u."


def _aligned_member(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored member whose data starts on a 64-byte boundary, as torch aligns them (for mmap)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64_extra = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
    header_end = archive.fp.tell() + 30 + len(name.encode()) + 4 + zip64_extra
    info.extra = struct.pack("<HH", 0x4246, (-header_end) % 64) + b"Z" * ((-header_end) % 64)
    return info


def write_pth(path: str | os.PathLike, tensors: Mapping[str, ArrayLike]) -> None:
    """Write a state dict that `torch.load` reads, one tensor in memory at a time."""
    path = os.fspath(path)
    lazies = {name: as_lazy(t) for name, t in tensors.items()}
    for name, t in lazies.items():
        if t.dtype not in STORAGE_NAMES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in a .pth file")
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(f"{prefix}/data.pkl", _state_dict_pickle(lazies))
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, t in enumerate(lazies.values()):
            data = np.ascontiguousarray(t.load(), dtype=t.dtype)
            member = _aligned_member(archive, f"{prefix}/data/{key}", data.nbytes)
            with archive.open(
                member, "w", force_zip64=member.file_size * 1.05 > zipfile.ZIP64_LIMIT
            ) as out:
                out.write(memoryview(data.reshape(-1).view(np.uint8)))
            del data
        archive.writestr(f"{prefix}/version", "3\n")
