"""The launchers: launch/tpu_pod.sh and launch/gpu_slurm.sbatch through their dry runs and through
stand-ins for gcloud, srun, squeue and scontrol; llama2_jax/distributed.py fed the environments
that Slurm, Open MPI and the explicit JAX_* variables give a process."""

import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from llama2_jax import distributed
from llama2_jax.distributed import LayoutError, ProcessLayout, derive_layout, expand_hostlist

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
GPU_SLURM = REPO / "launch" / "gpu_slurm.sbatch"
LOCAL_MULTIHOST = REPO / "launch" / "local_multihost.sh"
JAX_VERSION = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
LABEL = "--labels=created_by=llama2_jax"


def _git(repo: pathlib.Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


# A job that behaves like training on a pod: it runs until SIGTERM, then "checkpoints" and exits 75.
JOB = """\
import signal, sys, time
def stop(*_):
    print("checkpoint saved", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("started", sys.argv[1:], flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def pod_repo(tmp_path):
    """A clean git checkout holding the launcher, requirements.txt and a job."""
    repo = tmp_path / "checkout"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(TPU_POD, repo / "launch" / "tpu_pod.sh")
    shutil.copy(REPO / "requirements.txt", repo / "requirements.txt")
    (repo / "job.py").write_text(JOB)
    (repo / "old.txt").write_text("removed later\n")
    _git(repo, "init", "--quiet")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "first")
    return repo


FAKE_GCLOUD = """\
#!{python}
# gcloud's stand-in: records every call; `describe` prints FAKE_GCLOUD_LABEL; `scp` copies into and
# `ssh --command` runs bash in each directory of FAKE_GCLOUD_WORKERS, as if each were a worker's home.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
workers = [w for w in os.environ.get("FAKE_GCLOUD_WORKERS", "").split(os.pathsep) if w]
verb = args[3] if len(args) > 3 else ""
if verb == "describe":
    print(os.environ.get("FAKE_GCLOUD_LABEL", ""))
elif verb == "scp":
    for home in workers:
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif verb == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    failed = [subprocess.run(["bash", "-c", command], cwd=home, env={{**os.environ, "HOME": home}}).returncode
              for home in workers]
    sys.exit(1 if any(failed) else 0)
"""

# `python -m venv DIR` makes a virtualenv whose python is this one and whose pip only records its
# arguments; anything else goes to this python. Setup runs in seconds and offline.
FAKE_PYTHON = """\
#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  ln -s {python} "$3/bin/python"
  printf '#!/usr/bin/env bash\\necho "$*" >> "$(dirname "$0")/../pip_calls"\\n' > "$3/bin/pip"
  chmod +x "$3/bin/pip"
  exit 0
fi
exec {python} "$@"
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with gcloud's stand-in first; returns (environment, workers' homes, calls so far)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "fake-python").write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable)))
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    workers = [tmp_path / f"worker{i}" for i in range(2)]
    for home in workers:
        home.mkdir()
    calls_file = tmp_path / "gcloud_calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "FAKE_GCLOUD_CALLS": str(calls_file), "FAKE_GCLOUD_WORKERS": os.pathsep.join(map(str, workers)),
           "FAKE_GCLOUD_LABEL": "llama2_jax"}
    env = {k: v for k, v in env.items() if not k.startswith("TPU_POD_")}

    def calls() -> list[list[str]]:
        if not calls_file.exists():
            return []
        return [json.loads(line) for line in calls_file.read_text().splitlines()]

    return env, workers, calls


def _pod(script: pathlib.Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_POD_")}
    return subprocess.run(["bash", str(script), *args], check=False, capture_output=True, text=True, timeout=60,
                          env=env)


def _printed(done: subprocess.CompletedProcess) -> list[list[str]]:
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def _remote(argv: list[str]) -> list[str]:
    """The commands of an ssh call's --command, split where they are joined."""
    command = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    return re.split(r"; | & ", command)


DESCRIBE = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod", "--zone=us-east5-a",
            "--format=value(labels.created_by)"]
DESCRIBE_QR = ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod", "--zone=us-east5-a",
               "--format=value(tpu.nodeSpec[0].node.labels.created_by)"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-east5-a", "--worker=all"]
SSH_QR = ["gcloud", "compute", "tpus", "queued-resources", "ssh", "pod", "--zone=us-east5-a", "--node=all",
          "--worker=all"]


# ------------------------------------------------------------------------------------------------
# launch/tpu_pod.sh: dry runs print exactly the gcloud commands, and run nothing.

def test_create_one_slice(fake_gcloud):
    env, _, calls = fake_gcloud
    printed = _printed(_pod(TPU_POD, "--dry-run", "create", "pod", "us-east5-a", env=env))
    assert printed == [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-east5-a",
                        "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", LABEL]]
    assert calls() == []


def test_create_several_slices_as_one_queued_resource(fake_gcloud):
    env, _, calls = fake_gcloud
    env = {**env, "TPU_POD_PROJECT": "my-project", "TPU_POD_ACCELERATOR_TYPE": "v5p-128"}
    printed = _printed(_pod(TPU_POD, "create", "pod", "us-east5-a", "--dry-run", "--slices", "2", "--spot",
                            env=env))
    assert printed == [["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--zone=us-east5-a",
                        "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
                        "--node-prefix=pod", LABEL, "--spot", "--project=my-project"]]
    assert calls() == []


@pytest.mark.parametrize("accelerator, version", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-32", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base"),
])
def test_the_runtime_version_follows_the_generation(accelerator, version):
    printed = _printed(_pod(TPU_POD, "--dry-run", "create", "pod", "us-east5-a",
                            f"--accelerator-type={accelerator}", "--reserved"))
    assert printed[0][-3:] == [f"--version={version}", LABEL, "--reserved"]


def test_setup_copies_this_checkout_and_installs_the_pinned_jax(pod_repo, fake_gcloud):
    env, _, calls = fake_gcloud
    head = _git(pod_repo, "rev-parse", "HEAD")
    tarball = f"llama2_jax-{head[:12]}.tar.gz"
    printed = _printed(_pod(pod_repo / "launch/tpu_pod.sh", "--dry-run", "setup", "pod", "us-east5-a", env=env))
    assert printed[:2] == [
        DESCRIBE,
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{env['TMPDIR']}/{tarball}", f"pod:{tarball}",
         "--zone=us-east5-a", "--worker=all"],
    ]
    assert printed[2][:8] == SSH and len(printed) == 3
    remote = _remote(printed[2])
    for command in ["set -e", "rd=llama2_jax", f"tarball=\"$PWD/{tarball}\"", "trap 'rm -f \"$tarball\"' EXIT",
                    "tar -xzf \"$tarball\" -C \"$rd\"",
                    f"echo {head} > \"$rd/.llama2_jax_checkout\"",
                    ".venv/bin/pip install --quiet --upgrade pip",
                    f".venv/bin/pip install --quiet -r requirements.txt 'jax[tpu]=={JAX_VERSION}' gcsfs"]:
        assert command in remote
    assert calls() == [] and not (pathlib.Path(env["TMPDIR"]) / tarball).exists()


def test_setup_clones_a_commit_on_every_slice(fake_gcloud):
    env, _, calls = fake_gcloud
    printed = _printed(_pod(TPU_POD, "--dry-run", "setup", "pod", "us-east5-a", "--slices=2",
                            "--repo-url=https://example.com/llama2_jax.git", "--commit=0123abcd",
                            "--remote-dir=/mnt/disks/work/llama2_jax", "--python=python3.11", "--jax-version=0.10.1",
                            env=env))
    assert printed[0] == DESCRIBE_QR and printed[1][:9] == SSH_QR and len(printed) == 2
    remote = _remote(printed[1])
    for command in ["rd=/mnt/disks/work/llama2_jax",
                    "git -C \"$rd\" fetch --quiet origin '+refs/heads/*:refs/remotes/origin/*'",
                    "git -C \"$rd\" checkout --quiet --force --detach 0123abcd",
                    ".venv/bin/pip install --quiet -r requirements.txt 'jax[tpu]==0.10.1' gcsfs"]:
        assert command in remote
    assert any("git -C \"$rd\" remote add origin https://example.com/llama2_jax.git" in c for c in remote)
    assert any("! python3.11 -m venv .venv" in c for c in remote)
    assert "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv" in remote
    assert calls() == []


def test_run_starts_the_command_in_the_background_with_a_log_and_a_pid_file(fake_gcloud):
    env, _, calls = fake_gcloud
    printed = _printed(_pod(TPU_POD, "--dry-run", "run", "pod", "us-east5-a", "--", "python", "-m", "llama2_jax",
                            "train", "--config=configs/pretrain.py:7b", "--workdir=gs://bucket/runs/7b",
                            "--config.train.sample_prompt=It's", env=env))
    assert printed[0] == DESCRIBE and printed[1][:8] == SSH and len(printed) == 2
    remote = _remote(printed[1])
    assert ("job=(python -m llama2_jax train --config=configs/pretrain.py:7b --workdir=gs://bucket/runs/7b "
            "'--config.train.sample_prompt=It'\\''s')") in remote
    assert ('PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv" setsid nohup "${job[@]}" '
            ">> logs/run.log 2>&1 < /dev/null") in remote
    assert "echo $! > logs/run.pid" in remote
    assert calls() == []


def test_a_run_across_slices_puts_data_on_dcn():
    printed = _printed(_pod(TPU_POD, "--dry-run", "run", "pod", "us-east5-a", "--slices=4", "--",
                            "python", "-m", "llama2_jax", "train", "--config=configs/pretrain.py:70b",
                            "--workdir=gs://bucket/runs/70b"))
    assert printed[0] == DESCRIBE_QR and printed[1][:9] == SSH_QR
    assert ("job=(python -m llama2_jax train --config=configs/pretrain.py:70b --workdir=gs://bucket/runs/70b "
            "--config.mesh.dcn_data=4)") in _remote(printed[1])
    # A command that chooses its own DCN axes is left as it is.
    printed = _printed(_pod(TPU_POD, "--dry-run", "run", "pod", "us-east5-a", "--slices=4", "--", "python", "-m",
                            "llama2_jax", "train", "--config=configs/pretrain.py:70b", "--workdir=gs://b/r",
                            "--config.mesh.dcn_fsdp=4", "--config.mesh.dcn_data=1"))
    assert ("job=(python -m llama2_jax train --config=configs/pretrain.py:70b --workdir=gs://b/r "
            "--config.mesh.dcn_fsdp=4 --config.mesh.dcn_data=1)") in _remote(printed[1])


def test_logs_tails_every_worker_without_needing_ownership():
    printed = _printed(_pod(TPU_POD, "--dry-run", "logs", "pod", "us-east5-a", "--lines=20", "--follow"))
    assert len(printed) == 1 and printed[0][:8] == SSH
    remote = _remote(printed[0])
    assert "log=llama2_jax/logs/run.log" in remote
    assert remote[-1] == 'tail -n 20 -F "$log" | sed -u "s/^/[$(hostname)] /"'


def test_stop_sends_sigterm_then_sigkill_after_the_wait():
    printed = _printed(_pod(TPU_POD, "--dry-run", "stop", "pod", "us-east5-a", "--wait=900"))
    assert printed[0] == DESCRIBE and printed[1][:8] == SSH and len(printed) == 2
    remote = _remote(printed[1])
    assert 'kill -TERM "$group"' in remote
    assert any("for _ in $(seq 900)" in c for c in remote)
    assert 'if running "$group"' in remote and 'then kill -KILL -- "-$group"' in remote


def test_delete_checks_the_label_first():
    assert _printed(_pod(TPU_POD, "--dry-run", "delete", "pod", "us-east5-a")) == [
        DESCRIBE, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=us-east5-a"]]
    assert _printed(_pod(TPU_POD, "--dry-run", "delete", "pod", "us-east5-a", "--slices=2")) == [
        DESCRIBE_QR, ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", "--zone=us-east5-a",
                      "--force"]]


@pytest.mark.parametrize("args, expected", [
    ([], "expected SUBCOMMAND TPU_NAME ZONE"),
    (["start", "pod", "us-east5-a"], "unknown subcommand start"),
    (["run", "pod", "us-east5-a"], "run needs the command after --"),
    (["logs", "pod", "us-east5-a", "--", "ls"], "only run takes a command"),
    (["create", "Pod_1", "us-east5-a"], "TPU_NAME Pod_1"),
    (["create", "pod", "east"], "ZONE east"),
    (["create", "pod", "us-east5-a", "--slices=0"], "--slices=0"),
    (["create", "pod", "us-east5-a", "--accelerator-type=v9x-8"], "pass --runtime-version"),
    (["create", "pod", "us-east5-a", "--accelerator-type=big"], "--accelerator-type=big"),
    (["create", "pod", "us-east5-a", "--colour=red"], "unknown option --colour"),
    (["create", "pod", "us-east5-a", "--project"], "--project needs a value"),
    (["setup", "pod", "us-east5-a", "--remote-dir=.."], "--remote-dir=.."),
    (["setup", "pod", "us-east5-a", "--remote-dir=."], "--remote-dir=."),
])
def test_usage_errors_exit_2_with_one_line(args, expected):
    done = _pod(TPU_POD, "--dry-run", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_help_exits_0():
    done = _pod(TPU_POD, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: launch/tpu_pod.sh")


def test_a_dirty_checkout_is_refused_unless_allowed(pod_repo, fake_gcloud):
    env, _, calls = fake_gcloud
    script = pod_repo / "launch/tpu_pod.sh"
    (pod_repo / "job.py").write_text(JOB + "# edited\n")
    done = _pod(script, "--dry-run", "setup", "pod", "us-east5-a", env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "uncommitted changes" in done.stderr and "--allow-dirty" in done.stderr
    printed = _printed(_pod(script, "--dry-run", "setup", "pod", "us-east5-a", "--allow-dirty", env=env))
    assert printed[1][5].endswith("-dirty.tar.gz")
    # A clone of a given commit does not depend on the checkout, so it does not ask.
    assert _pod(script, "--dry-run", "setup", "pod", "us-east5-a", "--repo-url=https://example.com/r.git",
                "--commit=abc", env=env).returncode == 0
    assert calls() == []


def test_a_tpu_without_the_label_is_left_alone(fake_gcloud):
    env, _, calls = fake_gcloud
    env = {**env, "FAKE_GCLOUD_LABEL": ""}
    for subcommand in ("setup", "stop", "delete"):
        done = _pod(TPU_POD, subcommand, "pod", "us-east5-a", "--repo-url=https://example.com/r.git",
                    "--commit=abc", env=env)
        assert done.returncode == 1 and "no label created_by=llama2_jax" in done.stderr, done.stderr
    assert [call[3] for call in calls()] == ["describe"] * 3


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_setup_run_logs_stop_on_stand_in_workers(pod_repo, fake_gcloud):
    """Every remote command really runs, under bash, in two stand-in worker homes."""
    env, workers, _ = fake_gcloud
    script = pod_repo / "launch/tpu_pod.sh"
    head = _git(pod_repo, "rev-parse", "HEAD")
    pod = ("pod", "us-east5-a", f"--python={pathlib.Path(env['PATH'].split(os.pathsep)[0]) / 'fake-python'}")
    try:
        done = _pod(script, "setup", *pod, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        for home in workers:
            checkout = home / "llama2_jax"
            assert (checkout / "job.py").read_text() == JOB
            assert (checkout / ".llama2_jax_checkout").read_text() == f"{head}\n"
            assert (checkout / ".venv/pip_calls").read_text().splitlines() == [
                "install --quiet --upgrade pip",
                f"install --quiet -r requirements.txt jax[tpu]=={JAX_VERSION} gcsfs"]
        assert not list(pathlib.Path(env["TMPDIR"]).glob("llama2_jax-*.tar.gz"))  # the local tarball is gone
        assert not list(workers[0].glob("llama2_jax-*.tar.gz"))  # so are the copies

        done = _pod(script, "run", *pod, "--", "python", "job.py", "it's", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        logs = [home / "llama2_jax/logs/run.log" for home in workers]
        _wait_for(lambda: all(log.exists() and "started" in log.read_text() for log in logs))
        assert "=== " in logs[0].read_text() and "python job.py it\\'s" in logs[0].read_text()
        again = _pod(script, "run", *pod, "--", "python", "job.py", env=env)
        assert again.returncode == 1 and "still running" in again.stderr

        # A second setup would replace the files under a running command.
        assert _pod(script, "setup", *pod, env=env).returncode == 1

        done = _pod(script, "logs", *pod, env=env)
        assert done.returncode == 0 and done.stdout.count("] started [\"it's\"]") == 2, done.stdout

        done = _pod(script, "stop", *pod, "--wait=20", env=env)
        assert done.returncode == 0 and done.stdout.count(": stopped") == 2, done.stdout + done.stderr
        assert all("checkpoint saved" in log.read_text() for log in logs)
        assert not (workers[0] / "llama2_jax/logs/run.pid").exists()
        assert "nothing running" in _pod(script, "stop", *pod, env=env).stdout

        # A new commit replaces the files, and keeps the virtualenv and the logs.
        (pod_repo / "old.txt").unlink()
        _git(pod_repo, "commit", "--quiet", "-am", "second")
        assert _pod(script, "setup", *pod, env=env).returncode == 0
        checkout = workers[1] / "llama2_jax"
        assert not (checkout / "old.txt").exists() and (checkout / "job.py").exists()
        assert (checkout / ".llama2_jax_checkout").read_text() == f"{_git(pod_repo, 'rev-parse', 'HEAD')}\n"
        assert len((checkout / ".venv/pip_calls").read_text().splitlines()) == 4
        assert "checkpoint saved" in (checkout / "logs/run.log").read_text()
    finally:
        for pid_file in (home / "llama2_jax/logs/run.pid" for home in workers):
            if pid_file.exists():
                subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], check=False)


def test_setup_leaves_a_directory_it_did_not_make(pod_repo, fake_gcloud):
    env, workers, _ = fake_gcloud
    (workers[1] / "llama2_jax").mkdir()
    (workers[1] / "llama2_jax" / "notes.txt").write_text("mine\n")
    done = _pod(pod_repo / "launch/tpu_pod.sh", "setup", "pod", "us-east5-a", "--python=/bin/false", env=env)
    assert done.returncode == 1 and "setup did not make it; pass another --remote-dir" in done.stderr
    assert (workers[1] / "llama2_jax" / "notes.txt").read_text() == "mine\n"


# ------------------------------------------------------------------------------------------------
# launch/gpu_slurm.sbatch

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS": "4",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "96"}


def _sbatch(*args: str, env: dict, bin_dir: pathlib.Path | None = None, cwd=None) -> subprocess.CompletedProcess:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "LLAMA2_JAX_DRY_RUN"}
    return subprocess.run(["bash", str(GPU_SLURM), *args], check=False, capture_output=True, text=True, timeout=60,
                          env={**clean, "PATH": path, **env}, cwd=cwd)


def test_slurm_dry_run_one_process_per_node(tmp_path):
    done = _sbatch("--dry-run", "python", "-m", "llama2_jax", "train", "--config=configs/pretrain.py:7b",
                   "--workdir=/shared/runs/7b", env={**SLURM_JOB, "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == [
        "srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=0",
        "--label", "python", "-m", "llama2_jax", "train", "--config=configs/pretrain.py:7b",
        "--workdir=/shared/runs/7b"]


def test_slurm_dry_run_one_process_per_gpu_from_the_environment_variable():
    job = {**SLURM_JOB, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
           "LLAMA2_JAX_DRY_RUN": "1"}
    done = _sbatch("python", "-m", "llama2_jax", "train", "--config.train.sample_prompt=It's", env=job)
    assert shlex.split(done.stdout) == [
        "srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=12", "--kill-on-bad-exit=0",
        "--label", "python", "-m", "llama2_jax", "train", "--config.train.sample_prompt=It's"]
    # Without --ntasks-per-node, the tasks per node come from the totals.
    job.pop("SLURM_NTASKS_PER_NODE")
    assert "--ntasks-per-node=8" in _sbatch("python", "x.py", env=job).stdout


def test_slurm_dry_run_inside_salloc():
    """An salloc shell has the job's CPUs per node in SLURM_JOB_CPUS_PER_NODE only."""
    job = {k: v for k, v in SLURM_JOB.items() if k != "SLURM_CPUS_ON_NODE"}
    job.update(SLURM_JOB_CPUS_PER_NODE="96(x4)", SLURM_NTASKS="32", SLURM_NTASKS_PER_NODE="8")
    done = _sbatch("--dry-run", "python", "x.py", env=job)
    assert shlex.split(done.stdout)[:6] == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8",
                                            "--cpus-per-task=12", "--kill-on-bad-exit=0"]


@pytest.mark.parametrize("args, env, status, expected", [
    ([], SLURM_JOB, 2, "no command to run"),
    (["--dry-run"], SLURM_JOB, 2, "no command to run"),
    (["python", "x.py"], {**SLURM_JOB, "LLAMA2_JAX_DRY_RUN": "yes"}, 2, "LLAMA2_JAX_DRY_RUN=yes"),
    (["--dry-run", "python", "x.py"], {}, 1, "SLURM_JOB_ID is not set: submit with sbatch"),
    (["--dry-run", "python", "x.py"], {**SLURM_JOB, "SLURM_NTASKS": "6", "SLURM_NTASKS_PER_NODE": ""}, 1,
     "6 tasks do not spread evenly over 4 nodes"),
])
def test_slurm_errors(args, env, status, expected):
    done = _sbatch(*args, env=env)
    assert done.returncode == status and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


@pytest.fixture
def fake_slurm(tmp_path):
    """srun exits FAKE_SRUN_STATUS, squeue prints FAKE_SQUEUE_STATE, scontrol records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "srun $*"\nexit "$FAKE_SRUN_STATUS"\n')
    (bin_dir / "squeue").write_text('#!/usr/bin/env bash\necho "$FAKE_SQUEUE_STATE"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol_calls\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return bin_dir, tmp_path / "scontrol_calls"


@pytest.mark.parametrize("srun_status, state, restarts, requeued", [
    (75, "RUNNING", "0", True),  # interrupted by the time-limit signal: requeue
    (75, "RUNNING", "49", True),
    (75, "RUNNING", "50", False),  # LLAMA2_JAX_MAX_REQUEUES reached
    (75, "CANCELLED", "0", False),  # scancel: stay cancelled
    (75, "", "0", False),  # the state cannot be read: do not guess
    (0, "RUNNING", "0", False),  # finished
    (1, "RUNNING", "0", False),  # failed
])
def test_slurm_requeues_an_interrupted_run(fake_slurm, tmp_path, srun_status, state, restarts, requeued):
    bin_dir, scontrol_calls = fake_slurm
    env = {**SLURM_JOB, "FAKE_SRUN_STATUS": str(srun_status), "FAKE_SQUEUE_STATE": state,
           "SLURM_RESTART_COUNT": restarts, "SLURM_SUBMIT_DIR": str(tmp_path)}
    done = _sbatch("python", "-m", "llama2_jax", "train", env=env, bin_dir=bin_dir)
    assert done.returncode == srun_status, done.stderr
    assert done.stdout.startswith("srun --nodes=4 --ntasks=4 ")
    assert (scontrol_calls.read_text() if scontrol_calls.exists() else "") == (
        "requeue 4242\n" if requeued else "")
    if srun_status == 75:
        assert ("requeueing job 4242" in done.stderr) == requeued


def test_the_script_and_the_package_agree_on_the_resumable_status():
    assert f"RESUMABLE_EXIT_STATUS={distributed.RESUMABLE_EXIT_STATUS}\n" in GPU_SLURM.read_text()


# ------------------------------------------------------------------------------------------------
# launch/local_multihost.sh

# Run by every process of a job: whether the coordinator's port can be bound as another program
# would bind it (without SO_REUSEPORT), and as process 0's coordinator binds it (gRPC, with it).
BIND_COORDINATOR_PORT = """\
import os, socket
port = int(os.environ["JAX_COORDINATOR_ADDRESS"].rpartition(":")[2])
def binds(reuse_port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        try:
            probe.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False
print(port, "taken by another program" if binds(False) else "held", "coordinator binds" if binds(True) else "")
"""


def _binds(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def test_local_multihost_holds_a_free_port_for_its_coordinator_while_the_job_runs():
    done = subprocess.run(["bash", str(LOCAL_MULTIHOST), "2", "1", "--", sys.executable, "-c", BIND_COORDINATOR_PORT],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    port = int(done.stdout.split()[2])
    assert sorted(done.stdout.splitlines()) == [f"[process {index}] {port} held coordinator binds" for index in (0, 1)]
    deadline = time.monotonic() + 10  # the holder looks for the launcher once a second
    while not _binds(port):
        assert time.monotonic() < deadline, f"port {port} is still held after the launcher exited"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# llama2_jax/distributed.py

@pytest.mark.parametrize("hostlist, hosts", [
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("gpu-a[08-10],gpu-b3", ["gpu-a08", "gpu-a09", "gpu-a10", "gpu-b3"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("login1", ["login1"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[001", "node]1", "n[a-b]", ""])
def test_expand_hostlist_rejects_what_it_cannot_read(hostlist):
    with pytest.raises(LayoutError):
        expand_hostlist(hostlist)


def _srun(**overrides) -> dict[str, str]:
    """What srun gives task 2 of `srun --nodes=4 --ntasks-per-node=1` on 8-GPU nodes."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_STEP_NUM_NODES": "4",
           "SLURM_STEP_NODELIST": "node[001-003,007]", "SLURM_JOB_NODELIST": "node[001-003,007]",
           "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


PORT = 65536 - 4096 + 4242 % 4096


@pytest.mark.parametrize("env, layout", [
    (_srun(), ProcessLayout("Slurm", f"node001:{PORT}", 4, 2, (0, 1, 2, 3, 4, 5, 6, 7))),
    # one process per GPU, every task seeing the node's 8 GPUs: task 13 is the 6th of node 1
    (_srun(SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NODEID="1",
           SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_STEP_NODELIST="gpu[07-08]"),
     ProcessLayout("Slurm", f"gpu07:{PORT}", 16, 13, (5,))),
    # --gpus-per-task=1: each task sees only its own GPU
    (_srun(SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NODEID="1",
           SLURM_STEP_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="5", SLURM_STEP_GPUS="5"),
     ProcessLayout("Slurm", f"node001:{PORT}", 16, 13, (0,))),
    # two processes per node, four GPUs each; the last node runs fewer tasks
    (_srun(SLURM_NTASKS="7", SLURM_STEP_NUM_TASKS="7", SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="3",
           SLURM_STEP_TASKS_PER_NODE="2(x3),1"),
     ProcessLayout("Slurm", f"node001:{PORT}", 7, 6, (0, 1, 2, 3, 4, 5, 6, 7))),
    (_srun(SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="2",
           SLURM_STEP_TASKS_PER_NODE="2(x4)"),
     ProcessLayout("Slurm", f"node001:{PORT}", 8, 5, (4, 5, 6, 7))),
    # no GPU variables (a CUDA_VISIBLE_DEVICES-less CPU job): every device the process sees
    (_srun(CUDA_VISIBLE_DEVICES=None, SLURM_STEP_GPUS=None, SLURM_GPUS_ON_NODE=None),
     ProcessLayout("Slurm", f"node001:{PORT}", 4, 2, None)),
    # only SLURM_GPUS_ON_NODE; the job's node list when the step's is missing; a chosen port
    (_srun(CUDA_VISIBLE_DEVICES=None, SLURM_STEP_GPUS=None, SLURM_GPUS_ON_NODE="4", SLURM_STEP_NODELIST=None,
           SLURM_JOB_NODELIST="a100-[10-13]", JAX_COORDINATOR_PORT="12345"),
     ProcessLayout("Slurm", "a100-10:12345", 4, 2, (0, 1, 2, 3))),
    # Open MPI 4 inside Slurm: the ranks, not the srun step that started mpirun's daemons
    (_srun(OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_LOCAL_RANK="1",
           OMPI_COMM_WORLD_LOCAL_SIZE="8", OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"),
     ProcessLayout("Open MPI", f"10.96.0.1:{65536 - 4096 + (1531576320 // 4096) % 4096}", 16, 9, (1,))),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "JAX_COORDINATOR_ADDRESS": "head:9999"},
     ProcessLayout("Open MPI", "head:9999", 2, 1, None)),
    # explicit variables win over everything, devices included
    (_srun(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
           JAX_LOCAL_DEVICE_IDS="2,3"),
     ProcessLayout("explicit JAX_* variables", "10.0.0.1:1234", 2, 1, (2, 3))),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:20000", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     ProcessLayout("explicit JAX_* variables", "127.0.0.1:20000", 2, 0, None)),
    # a coordinator alone overrides the launcher's
    (_srun(JAX_COORDINATOR_ADDRESS="ib-node001:7000"), ProcessLayout("Slurm", "ib-node001:7000", 4, 2,
                                                                      (0, 1, 2, 3, 4, 5, 6, 7))),
])
def test_derive_layout(env, layout):
    assert derive_layout(env) == layout


@pytest.mark.parametrize("env", [
    {},
    _srun(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0", SLURM_STEP_TASKS_PER_NODE="1"),
    # the batch script itself, or an salloc shell: the job's SLURM_NTASKS but no srun step
    {k: v for k, v in _srun(SLURM_PROCID="0").items() if not k.startswith("SLURM_STEP")},
    {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
    {"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1", "TPU_WORKER_ID": "1"},  # a TPU pod is left to jax
])
def test_derive_layout_none_for_one_process_or_a_tpu_pod(env):
    assert derive_layout(env) is None


@pytest.mark.parametrize("env, expected", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "expected HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "below the count"),
    (_srun(SLURM_PROCID="4"), "process 4 of 4"),
    (_srun(SLURM_NTASKS="12", SLURM_STEP_NUM_TASKS="12", SLURM_STEP_TASKS_PER_NODE="3(x4)"),
     "do not split evenly among the 3 processes"),
    (_srun(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None), "launch with srun or mpirun"),
    (_srun(SLURM_STEP_NODELIST="node[1-"), "Slurm host list"),
    (_srun(SLURM_LOCALID=None), "SLURM_LOCALID is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, "set JAX_COORDINATOR_ADDRESS"),
    (_srun(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
           JAX_LOCAL_DEVICE_IDS="all"), "JAX_LOCAL_DEVICE_IDS='all'"),
])
def test_derive_layout_errors_name_the_fix(env, expected):
    with pytest.raises(LayoutError, match=re.escape(expected)):
        derive_layout(env)


def test_the_slurm_coordinator_is_the_one_jax_would_pick(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = _srun(SLURM_STEP_NODELIST="gpu-a[08-10],gpu-b3")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert derive_layout(env).coordinator_address == SlurmCluster.get_coordinator_address(None, None)


@pytest.fixture
def initialize_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    return calls


def test_initialize_passes_the_derived_layout_to_jax(initialize_calls):
    assert distributed.initialize_from_environment(_srun(SLURM_PROCID="3", SLURM_NODEID="3")) is True
    assert initialize_calls == [((f"node001:{PORT}",), {
        "num_processes": 4, "process_id": 3, "local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7],
        "cluster_detection_method": "deactivate"})]


def test_initialize_uses_gloo_for_cpu_processes(initialize_calls, monkeypatch):
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:20000", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_PLATFORMS": "cpu"}
    assert distributed.initialize_from_environment(env) is True
    assert updates == [("jax_cpu_collectives_implementation", "gloo")]
    assert initialize_calls == [(("127.0.0.1:20000",), {
        "num_processes": 2, "process_id": 1, "local_device_ids": None, "cluster_detection_method": "deactivate"})]


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},  # the batch script, not srun
    _srun(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0", SLURM_STEP_TASKS_PER_NODE="1"),
])
def test_initialize_does_nothing_for_a_single_process(initialize_calls, env):
    assert distributed.initialize_from_environment(env) is False
    assert initialize_calls == []


def test_initialize_leaves_a_tpu_pod_to_jax(initialize_calls, monkeypatch):
    assert distributed.initialize_from_environment({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}) is True
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.initialize_from_environment({}) is True
    assert distributed.initialize_from_environment({"JAX_PLATFORMS": "cpu"}) is False
    assert initialize_calls == [((), {}), ((), {})]
