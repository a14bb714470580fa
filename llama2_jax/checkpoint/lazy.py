"""A tensor that is described now and read later.

Converters pass these around instead of arrays so that a whole checkpoint can be listed (names,
shapes, dtypes) while only the tensor being copied sits in memory. Transforms (transpose, reshape,
RoPE permutation, slicing) compose lazily and run when `load()` is finally called.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """Shape and dtype of a tensor plus a function that produces it on demand."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        array = np.asarray(self.produce())
        if array.shape != self.shape:
            raise ValueError(f"lazy tensor produced shape {array.shape}, promised {self.shape}")
        return array

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def then(
        self, transform: Callable[[np.ndarray], np.ndarray], shape=None, dtype=None
    ) -> LazyArray:
        """A new lazy tensor: this one passed through `transform` (shape/dtype default to unchanged)."""
        return LazyArray(
            tuple(self.shape if shape is None else shape),
            np.dtype(self.dtype if dtype is None else dtype),
            lambda: transform(self.load()),
        )

    def transpose(self, *axes: int) -> LazyArray:
        axes = axes or tuple(reversed(range(len(self.shape))))
        return self.then(lambda a: a.transpose(axes), shape=[self.shape[i] for i in axes])

    def reshape(self, *shape: int) -> LazyArray:
        return self.then(lambda a: a.reshape(shape), shape=shape)

    def astype(self, dtype) -> LazyArray:
        return self.then(lambda a: a.astype(dtype, copy=False), dtype=dtype)


ArrayLike = Union[np.ndarray, LazyArray]


def as_lazy(array) -> LazyArray:
    """Wrap an in-memory array (numpy or jax) so it can flow through the same code paths."""
    if isinstance(array, LazyArray):
        return array
    return LazyArray(tuple(array.shape), np.dtype(array.dtype), lambda: np.asarray(array))


def materialize(array: ArrayLike) -> np.ndarray:
    return array.load() if isinstance(array, LazyArray) else np.asarray(array)
