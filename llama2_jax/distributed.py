"""Joining a multi-process JAX job, from whatever the launcher put in the environment.

`derive_layout(environ)` turns the launcher's variables into the job's layout: the coordinator's
address, the process count, this process's index and the devices it drives. It is a pure function
of the mapping, so every launcher below is tested by feeding it the variables that launcher sets.

- Explicit: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (and
  optionally `JAX_LOCAL_DEVICE_IDS=0,1`), per process. `launch/local_multihost.sh` sets them.
- Open MPI (`mpirun`): `OMPI_COMM_WORLD_*`; the coordinator is rank 0's launcher host from
  `OMPI_MCA_orte_hnp_uri` (Open MPI 4). Open MPI 5 does not publish it: set
  `JAX_COORDINATOR_ADDRESS` there.
- Slurm (`srun`, see launch/gpu_slurm.sbatch): `SLURM_STEP_NUM_TASKS`/`SLURM_NTASKS`,
  `SLURM_PROCID`, `SLURM_LOCALID`; the coordinator is the first node of the step's node list.
- TPU pods (Cloud TPU VMs, GKE): left to `jax.distributed.initialize()`, which reads the slice's
  workers (and, across slices, the DCN coordinator) from the VM's metadata. On a Cloud TPU VM it
  runs whether the slice has one host or many (see launch/tpu_pod.sh).

Local devices: one process per node drives every GPU it sees; when several processes share a
node and each sees all its GPUs, process `k` of the node drives the `k`-th share of them; a process
that sees exactly one GPU (Slurm's `--gpus-per-task=1`) drives that one. `JAX_COORDINATOR_ADDRESS`
and `JAX_LOCAL_DEVICE_IDS` override what a launcher implies. CPU processes exchange collectives
over gloo. A single process with none of these set runs as is.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

# The exit status of a run that stopped early on SIGTERM (a preemption, a time limit) after saving
# a checkpoint, so that rerunning the same command resumes it. 75 is EX_TEMPFAIL in sysexits.h: a
# temporary failure, try again. launch/gpu_slurm.sbatch requeues the job when srun returns it.
RESUMABLE_EXIT_STATUS = 75

# Ports in the top 4096 of the ephemeral range, chosen from the job id as jax's own Slurm and Open
# MPI detection does, so that two jobs sharing a node rarely collide and every process agrees.
_PORT_RANGE_START = 65536 - 4096


class LayoutError(ValueError):
    """The environment describes a multi-process job inconsistently; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """Where this process sits in a multi-process job."""

    launcher: str  # "explicit JAX_* variables", "Open MPI" or "Slurm"
    coordinator_address: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # indices among the GPUs this process sees; None: all


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded: "node[001-003,007],gpu7" -> node001 ... gpu7.

    Zero padding is kept ("[08-10]" -> 08, 09, 10) and several bracket groups in one name multiply
    ("rack[1-2]-n[1-2]" -> rack1-n1, rack1-n2, rack2-n1, rack2-n2), as in `scontrol show hostnames`.
    """
    hosts: list[str] = []
    for name in _split_outside_brackets(hostlist.strip()):
        if not re.fullmatch(r"(?:[^\[\]]+|\[[^\[\]]+\])+", name):
            raise LayoutError(
                f"cannot read {name!r} in the Slurm host list {hostlist!r}; expected e.g. node[001-004,007]")
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            choices = _expand_ranges(ranges, hostlist) if ranges else [""]
            expanded = [prefix + literal + choice for prefix in expanded for choice in choices]
        hosts.extend(expanded)
    if not hosts:
        raise LayoutError("the Slurm host list is empty; launch with srun, which sets SLURM_STEP_NODELIST")
    return hosts


def _split_outside_brackets(hostlist: str) -> list[str]:
    names, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(hostlist[start:index])
            start = index + 1
    names.append(hostlist[start:])
    return [name for name in names if name]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    choices = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise LayoutError(f"cannot read the range [{ranges}] in the Slurm host list {hostlist!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        width = len(first) if first.startswith("0") else 0
        choices += [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    return choices


def derive_layout(environ: Mapping[str, str]) -> ProcessLayout | None:
    """The multi-process layout `environ` describes, or None: a single process, or a TPU pod (whose
    layout jax reads from the VM metadata itself).

    Explicit JAX_* variables come first; Open MPI before Slurm, because `mpirun` inside a Slurm job
    starts its daemons through srun, and its ranks inherit that step's SLURM_* variables (one task
    per node), which describe the daemons, not the ranks.
    """
    if environ.get("JAX_NUM_PROCESSES") or environ.get("JAX_PROCESS_ID"):
        layout = _explicit_layout(environ)
    elif "OMPI_COMM_WORLD_SIZE" in environ:
        layout = _open_mpi_layout(environ)
    elif _in_slurm_step(environ):
        layout = _slurm_layout(environ)
    elif environ.get("JAX_COORDINATOR_ADDRESS"):
        raise LayoutError(
            "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set to "
            "integers too; see launch/local_multihost.sh"
        )
    else:
        return None
    if layout.num_processes == 1:
        return None
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        ids = _integers(environ, "JAX_LOCAL_DEVICE_IDS", "a comma-separated list of device indices, e.g. 0,1")
        layout = dataclasses.replace(layout, local_device_ids=ids)
    return layout


def _explicit_layout(environ: Mapping[str, str]) -> ProcessLayout:
    coordinator = environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not coordinator:
        raise LayoutError(
            "JAX_NUM_PROCESSES/JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS is not; set it to "
            "host:port of process 0 (see launch/local_multihost.sh)"
        )
    hint = "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers"
    return _checked(ProcessLayout(
        launcher="explicit JAX_* variables",
        coordinator_address=_checked_address(coordinator, "JAX_COORDINATOR_ADDRESS"),
        num_processes=_integer(environ, "JAX_NUM_PROCESSES", hint),
        process_id=_integer(environ, "JAX_PROCESS_ID", hint),
        local_device_ids=None,
    ))


def _open_mpi_layout(environ: Mapping[str, str]) -> ProcessLayout:
    hint = "mpirun sets it for every rank; launch with mpirun"
    num_processes = _integer(environ, "OMPI_COMM_WORLD_SIZE", hint)
    process_id = _integer(environ, "OMPI_COMM_WORLD_RANK", hint)
    local_rank = _integer(environ, "OMPI_COMM_WORLD_LOCAL_RANK", hint)
    local_size = _integer(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", hint)
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator = _checked_address(environ["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
    else:
        uri = environ.get("OMPI_MCA_orte_hnp_uri", "")
        # "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911": the job id, then the launcher's addresses.
        match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
        if not match:
            raise LayoutError(
                "Open MPI does not say where rank 0 runs (no OMPI_MCA_orte_hnp_uri, as with Open MPI 5); "
                "set JAX_COORDINATOR_ADDRESS=HOST:PORT of rank 0's node, e.g. mpirun -x JAX_COORDINATOR_ADDRESS=..."
            )
        host = match.group(1) or f"[{match.group(2)}]"
        # Open MPI's job ids are multiples of 4096; their quotient is what differs between jobs.
        job_id = int(uri.split(".", 1)[0]) // 4096 if uri.split(".", 1)[0].isdigit() else 0
        coordinator = f"{host}:{_port(environ, job_id)}"
    return _checked(ProcessLayout(
        launcher="Open MPI",
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=_local_device_ids(environ, local_rank, local_size, "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ))


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    """Inside `srun`. The batch script itself and an `salloc` shell carry the job's SLURM_NTASKS
    too, but they are one process: only srun starts the job's processes."""
    return "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEP_NODELIST" in environ)


def _slurm_layout(environ: Mapping[str, str]) -> ProcessLayout:
    hint = "srun sets it for every task; launch with srun (see launch/gpu_slurm.sbatch)"
    count_variable = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    num_processes = _integer(environ, count_variable, hint)
    process_id = _integer(environ, "SLURM_PROCID", hint)
    local_rank = _integer(environ, "SLURM_LOCALID", hint)
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator = _checked_address(environ["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
    else:
        nodelist_variable = next(
            (name for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(name)),
            None)
        if nodelist_variable is None:
            raise LayoutError(f"SLURM_STEP_NODELIST is not set: {hint}")
        job_id = _integer(environ, "SLURM_JOB_ID", hint)
        # srun's default block distribution puts task 0 on the first node of the step.
        coordinator = f"{expand_hostlist(environ[nodelist_variable])[0]}:{_port(environ, job_id)}"
    return _checked(ProcessLayout(
        launcher="Slurm",
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=_local_device_ids(environ, local_rank, _slurm_tasks_on_this_node(environ),
                                           "SLURM_STEP_TASKS_PER_NODE"),
    ))


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """From "8(x3),4" (Slurm's run-length tasks per node) at this node's index, SLURM_NODEID."""
    for variable in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = environ.get(variable)
        if not value:
            continue
        counts: list[int] = []
        for part in value.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                raise LayoutError(f"cannot read {variable}={value!r}; expected e.g. 8(x4) or 8(x3),4")
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = _integer(environ, "SLURM_NODEID", "srun sets it with the tasks per node") if len(counts) > 1 else 0
        if node >= len(counts):
            raise LayoutError(f"SLURM_NODEID={node} but {variable}={value!r} lists {len(counts)} nodes")
        return counts[node]
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(environ["SLURM_NTASKS_PER_NODE"])
    return None


def _visible_gpus(environ: Mapping[str, str]) -> int | None:
    """How many GPUs this process sees; None when nothing says (a CPU job, or no GPU launcher)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # Slurm writes NoDevFiles when the task was given no GPU.
        return 0 if visible.strip() in ("", "NoDevFiles", "-1") else len(visible.split(","))
    for variable in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(variable):
            return len(environ[variable].split(","))
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    return None


def _local_device_ids(environ: Mapping[str, str], local_rank: int, local_size: int | None,
                      size_variable: str) -> tuple[int, ...] | None:
    visible = _visible_gpus(environ)
    if not visible:
        return None
    if visible == 1:
        return (0,)
    if local_size is None:
        raise LayoutError(
            f"this process sees {visible} GPUs but nothing says how many processes share its node "
            f"({size_variable} is not set); launch with srun or mpirun, or set JAX_LOCAL_DEVICE_IDS"
        )
    if not 0 <= local_rank < local_size:
        raise LayoutError(f"local rank {local_rank} is outside the {local_size} processes of this node")
    if visible % local_size:
        raise LayoutError(
            f"the {visible} GPUs this process sees do not split evenly among the {local_size} processes "
            "of its node; run one process per node or one per GPU"
        )
    share = visible // local_size
    return tuple(range(local_rank * share, (local_rank + 1) * share))


def _port(environ: Mapping[str, str], job_id: int) -> int:
    if environ.get("JAX_COORDINATOR_PORT"):
        return _integer(environ, "JAX_COORDINATOR_PORT", "a TCP port free on process 0's node")
    return _PORT_RANGE_START + job_id % 4096


def _integer(environ: Mapping[str, str], variable: str, hint: str) -> int:
    value = environ.get(variable, "")
    if not value.strip().isdigit():
        shown = f"{variable}={value!r}" if variable in environ else f"{variable} is not set"
        raise LayoutError(f"{shown}; {hint}")
    return int(value)


def _integers(environ: Mapping[str, str], variable: str, hint: str) -> tuple[int, ...]:
    parts = environ[variable].split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise LayoutError(f"{variable}={environ[variable]!r}; expected {hint}")
    return tuple(int(part) for part in parts)


def _checked_address(address: str, variable: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LayoutError(f"{variable}={address!r}; expected HOST:PORT, e.g. node001:12345")
    return address


def _checked(layout: ProcessLayout) -> ProcessLayout:
    if layout.num_processes < 1 or not 0 <= layout.process_id < layout.num_processes:
        raise LayoutError(
            f"{layout.launcher} says process {layout.process_id} of {layout.num_processes}; the index must "
            "be at least 0 and below the count"
        )
    return layout


def _on_cloud_tpu_vm() -> bool:
    """Whether jax found TPU chips and libtpu at import, which is the test its own TPU-pod
    detection starts from (it then asks the VM's metadata server for the slice's workers)."""
    try:
        return bool(importlib.import_module("jax._src.cloud_tpu_init").running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def _on_tpu_pod(environ: Mapping[str, str]) -> bool:
    for variable in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # GKE sets these
        if len([host for host in environ.get(variable, "").split(",") if host]) > 1:
            return True
    platforms = environ.get("JAX_PLATFORMS", "")
    return (not platforms or "tpu" in platforms) and _on_cloud_tpu_vm()


def initialize_from_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Initialises jax.distributed when the environment describes several processes.

    Returns whether it did. Must run before anything touches the devices.
    """
    environ = os.environ if environ is None else environ
    layout = derive_layout(environ)
    if layout is None and not _on_tpu_pod(environ):
        if environ.get("SLURM_NTASKS", "1").isdigit() and int(environ.get("SLURM_NTASKS", "1")) > 1:
            log.warning("SLURM_NTASKS=%s but this process was not started by srun, so it runs alone; "
                        "start the job's processes with srun (see launch/gpu_slurm.sbatch)",
                        environ["SLURM_NTASKS"])
        return False
    if environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if layout is None:
        jax.distributed.initialize()  # a TPU pod: jax reads it from the VM's metadata
        return True
    log.info("joining a %s job as process %d of %d (coordinator %s, local devices %s)",
             layout.launcher, layout.process_id, layout.num_processes, layout.coordinator_address,
             "all" if layout.local_device_ids is None else list(layout.local_device_ids))
    # Detection off: jax's own Slurm detection would otherwise fill in local_device_ids from
    # SLURM_LOCALID, giving one process per node a single GPU.
    jax.distributed.initialize(
        layout.coordinator_address,
        num_processes=layout.num_processes,
        process_id=layout.process_id,
        local_device_ids=None if layout.local_device_ids is None else list(layout.local_device_ids),
        cluster_detection_method="deactivate",
    )
    return True
