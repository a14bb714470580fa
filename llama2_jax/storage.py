"""Where a run's files live: a local directory or a bucket, behind one path type.

Every file a run writes or reads in its workdir (checkpoints, metrics, TensorBoard events, the
config and tokenizer copies, answers), every checkpoint or tokenizer it reads by path and the tfds
data_dir it reads datasets from go through `etils.epath`, the path layer orbax already uses: a
local path is a local file, and a URL (`gs://bucket/runs/7b`) is an object in a bucket, reached
through the fsspec filesystem of its scheme. orbax writes the arrays themselves with tensorstore,
and array_record reads a dataset's records, each reaching gs:// on its own.

A bucket's filesystem is an install option: `pip install -e ".[gcs]"` (or `pip install gcsfs`)
for gs://. A URL whose filesystem is missing is refused by `check_filesystem` before anything is
created, with one line naming what to install.
"""

from __future__ import annotations

import io
import math
import os
import time

from etils import epath

# The bucket URL schemes a run can use, with the package etils.epath needs to reach them and how
# to install it. epath also knows s3:// and az://, untried here with orbax and tensorstore; any
# other "x://" it would take for a local directory named "x:".
FILESYSTEMS = {
    "gs": ("gcsfs", 'pip install -e ".[gcs]" (or pip install gcsfs)'),
}


class MissingFilesystemError(OSError):
    """A URL whose filesystem is not installed, or that no filesystem here can reach."""


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def url_scheme(path: str | os.PathLike) -> str:
    return os.fspath(path).split("://", 1)[0]


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is (a MissingFilesystemError if its filesystem is not
    installed), a local path with `~` expanded and made absolute (orbax refuses relative paths)."""
    if is_url(path):
        check_filesystem(path)
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def check_filesystem(path: str | os.PathLike) -> None:
    """Nothing for a local path; for a URL, a MissingFilesystemError unless its filesystem is
    installed. Creates nothing, so a refused URL leaves no trace (epath would otherwise fail only
    at the first write, after local directories named like the URL may have been made)."""
    if not is_url(path):
        return
    scheme = url_scheme(path)
    if scheme not in FILESYSTEMS:
        raise MissingFilesystemError(
            f"{os.fspath(path)}: {scheme}:// is not a storage this package can reach; use a local path "
            f"or a bucket URL ({', '.join(f'{known}://' for known in FILESYSTEMS)})")
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        package, install = FILESYSTEMS[scheme]
        raise MissingFilesystemError(
            f"{os.fspath(path)} is in a bucket, and {scheme}:// paths need {package}, which is not "
            f"installed: {install}") from None


def same_file(first: epath.Path, second: epath.Path) -> bool:
    """Whether two existing paths are one file (a bucket object is only ever itself)."""
    if is_url(first) or is_url(second):
        return os.fspath(first) == os.fspath(second)
    return os.path.samefile(first, second)


def write_whole(path: epath.Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new one, never a part:
    locally through a temporary file renamed over it; a bucket object is only ever replaced whole
    anyway, and a rename there is a copy and a delete."""
    if is_url(path):
        path.write_text(text)
        return
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


class BucketFile:
    """A growing file in a bucket. A bucket's objects cannot be appended to (gcsfs quietly opens
    mode "a" as "w"), so the whole content is kept here and the object rewritten: on `flush()`
    once `seconds_between_uploads` have passed since the last upload, and always on `close()`."""

    def __init__(self, path: epath.Path, content: bytes = b"", *, seconds_between_uploads: float = 0.0):
        self.path = path
        self._content = io.BytesIO()
        self._content.write(content)
        self._seconds_between_uploads = seconds_between_uploads
        self._uploaded_at = -math.inf

    def write(self, data: bytes | str) -> None:
        self._content.write(data.encode("utf-8") if isinstance(data, str) else data)

    def flush(self) -> None:
        if time.monotonic() - self._uploaded_at >= self._seconds_between_uploads:
            self._upload()

    def close(self) -> None:
        self._upload()

    def _upload(self) -> None:
        self.path.write_bytes(self._content.getvalue())
        self._uploaded_at = time.monotonic()


def open_for_appending(path: epath.Path, content: str, *, seconds_between_uploads: float):
    """`path` (re)written with `content` and open to append text to: a local file flushed on every
    `flush()`, or in a bucket a BucketFile uploaded at most every `seconds_between_uploads`."""
    path.write_text(content)
    if is_url(path):
        return BucketFile(path, content.encode("utf-8"), seconds_between_uploads=seconds_between_uploads)
    return path.open("a")
