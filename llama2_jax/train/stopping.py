"""Stopping a run early, on SIGTERM (a preemption, a time limit) or Ctrl-C, at one step that every
process agrees on, checked at every step.

Under jax.distributed with its preemption service (on by default: TPU pods, Slurm, every multi-process
job), SIGTERM is caught by jax's preemption notifier, which jax.distributed.initialize installs. The
process that gets it tells the coordination service, and a background thread on every process then
settles, once, the step after the furthest process's as the step where all stop.
`reached_preemption_sync_point(step)` only compares the step with that number: no collective and no
host sync per step, so the host keeps dispatching steps ahead of the devices. The notifier polls
about once a second, so the run stops a step after wherever the furthest process is by then. A first
Ctrl-C is raised again as SIGTERM, to take the same way.

A single process without jax.distributed: SIGTERM or a first Ctrl-C set a flag, read at every step.
Under jax.distributed with the preemption service switched off, that flag is all-gathered at every
step, a blocking host sync per step. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def preemption_service_running() -> bool:
    """Whether jax's preemption notifier and sync point are there (jax.distributed initialised with
    `jax_enable_preemption_service`, its default)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopRequests:
    """Within `with`: SIGTERM and Ctrl-C ask the run to stop; `should_stop(step)` says, at the same
    step on every process, when it is to stop."""

    def __init__(self):
        self.synchronised = preemption_service_running()
        self.requested = False  # here: SIGTERM or a first Ctrl-C came to this process
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # With the preemption service, SIGTERM stays with jax's notifier.
            handled = (signal.SIGINT,) if self.synchronised else (signal.SIGINT, signal.SIGTERM)
            self._previous = {number: signal.signal(number, self._handle) for number in handled}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        how = "Ctrl-C (press again to abort without saving)" if signum == signal.SIGINT else "SIGTERM"
        log.warning("%s: saving a checkpoint at the next step every process reaches, then stopping", how)
        if self.synchronised:
            signal.raise_signal(signal.SIGTERM)  # to jax's notifier, which tells the other processes

    def should_stop(self, step: int) -> bool:
        """Whether to stop before the step after `step`; called at every step, the same steps on every
        process (the preemption sync point counts on it)."""
        if self.synchronised:
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop:
                log.warning("a process of the job was sent SIGTERM or Ctrl-C: every process saves a checkpoint "
                            "at step %d, then stops", step)
            return stop
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
