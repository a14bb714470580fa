"""A port for the coordinator of a multi-process test, held by launch/reserve_port.py while the
block runs, as launch/local_multihost.sh holds one for its job: a port found free and let go could
be another test's coordinator by the time process 0 binds it."""

import contextlib
import pathlib
import subprocess
import sys
from collections.abc import Iterator

RESERVE_PORT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "reserve_port.py"


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    holder = subprocess.Popen([sys.executable, str(RESERVE_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        yield int(holder.stdout.readline())
    finally:
        holder.terminate()
        holder.wait(timeout=30)
