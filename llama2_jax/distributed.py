"""Joining a multi-process JAX job, from whatever the launcher put in the environment.

- TPU pods, Slurm and Open MPI describe the job themselves: `jax.distributed.initialize()`
  detects them with no arguments.
- Anywhere else (several processes on one machine, a plain SSH launch), set
  `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` per process.
- CPU processes exchange collectives over gloo.

A single process with none of these set runs as is.
"""

from __future__ import annotations

import os

import jax

_DETECTED_LAUNCHERS = {
    "SLURM_NTASKS": "Slurm",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "TPU pod",
}


def _launcher_size() -> int:
    for variable in _DETECTED_LAUNCHERS:
        value = os.environ.get(variable, "")
        if variable == "TPU_WORKER_HOSTNAMES":
            if value:
                return len(value.split(","))
        elif value.isdigit():
            return int(value)
    return 1


def initialize_from_environment() -> bool:
    """Initialises jax.distributed when the environment describes several processes.

    Returns whether it did. Must run before anything touches the devices.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not explicit and _launcher_size() <= 1:
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        try:
            num_processes = int(os.environ["JAX_NUM_PROCESSES"])
            process_id = int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                f"set to integers too ({error}); see launch/local_multihost.sh"
            ) from None
        jax.distributed.initialize(explicit, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True
