"""Workdirs and data in a bucket: a missing filesystem is one clear error, and a run in gs://
reading its dataset from gs:// resumes exactly.

The round trip runs against a Google Cloud Storage emulator on localhost (tests/gcs_emulator.py):
gcsfs reaches it through STORAGE_EMULATOR_HOST, tensorstore (orbax's array writes) through
TENSORSTORE_GCS_HTTP_URL and array_record (the dataset's records) through
CLOUD_STORAGE_EMULATOR_ENDPOINT, so checkpoints, metrics, TensorBoard events, the run's own files
and the training data all go through the gs:// API. It needs gcsfs and gcp-storage-emulator and is
skipped without them.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from llama2_jax import cli, storage
from llama2_jax.checkpoint.load import load_pretrained, load_tokenizer
from llama2_jax.data import sources
from llama2_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = [
    f"--config={REPO / 'configs' / 'pretrain.py'}:tiny",
    "--config.train.global_batch_size=8",
    "--config.train.seq_len=64",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=2",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.decay_steps=4",
    "--config.train.sample_length=0",
]
MISSING_GCSFS = ('error: gs://bucket/run is in a bucket, and gs:// paths need gcsfs, which is not installed: '
                 'pip install -e ".[gcs]" (or pip install gcsfs)')


def test_a_bucket_workdir_without_gcsfs_is_one_line_exit_status_1_and_leaves_nothing(tmp_path):
    # A gcsfs that fails to import stands for one not installed, whether or not it is here.
    blocker = tmp_path / "site" / "gcsfs"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("No module named \'gcsfs\'")\n')
    working_directory = tmp_path / "cwd"
    working_directory.mkdir()
    finished = subprocess.run(
        [sys.executable, "-m", "llama2_jax", "train", *TINY_RUN, "--config.train.steps=2", "--workdir=gs://bucket/run"],
        check=False, cwd=working_directory, env={**os.environ, "PYTHONPATH": str(blocker.parent)},
        capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.strip().splitlines() == [MISSING_GCSFS]
    assert list(working_directory.iterdir()) == []  # no local "gs:" directory


def test_a_url_no_filesystem_here_can_reach_is_refused_in_one_line():
    with pytest.raises(storage.MissingFilesystemError) as refused:
        storage.check_filesystem("memory://run")
    assert str(refused.value) == ("memory://run: memory:// is not a storage this package can reach; use a local "
                                  "path or a bucket URL (gs://)")


def test_a_local_workdir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.as_path("runs/tiny") == epath.Path(tmp_path / "runs" / "tiny")
    storage.check_filesystem("runs/tiny")  # a local path needs nothing


# --- against the emulator -------------------------------------------------------------------------


def emulator_environment(port: int) -> dict[str, str]:
    url = f"http://localhost:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore, orbax's array writes
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no credential search
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader of the dataset's files
        # gcsfs: do not ask the storage-control API, which the emulator lacks, for the bucket's layout
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@pytest.fixture(scope="module")
def bucket():
    """`gs://bucket` on a GCS emulator, for the tests of this module."""
    for module in ("gcsfs", "gcp_storage_emulator"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'needs {module}: pip install -e ".[gcs]" gcp-storage-emulator')
    # On a port the emulator binds itself, one the kernel picks: a port found free and let go here
    # could be another program's by the time the emulator binds it.
    emulator = subprocess.Popen([sys.executable, str(Path(__file__).parent / "gcs_emulator.py")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        serving = emulator.stdout.readline()  # the port, once it serves
        if not serving.strip().isdigit():
            raise RuntimeError(f"the GCS emulator exited with status {emulator.wait(timeout=30)} without serving")
        port = int(serving)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in emulator_environment(port).items():
                patch.setenv(name, value)
            yield "gs://bucket"
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)


def copy_bundled_corpus(data_dir: str) -> None:
    """The bundled corpus as built in the default data_dir, copied to the same place under `data_dir`."""
    built = epath.Path(sources.bundled_dataset("shakespeare").data_dir)
    copy = epath.Path(data_dir) / built.relative_to(sources.DEFAULT_DATA_DIR)
    copy.mkdir(parents=True, exist_ok=True)
    for path in built.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """Four steps in a local workdir on local data; two steps in the bucket on the same data in the
    bucket, then a rerun to four that resumes there. Returns (bucket workdir, local workdir, the
    working directory the runs started in)."""
    working_directory = tmp_path_factory.mktemp("cwd")
    local = str(tmp_path_factory.mktemp("local"))
    workdir, data_dir = f"{bucket}/runs/tiny", f"{bucket}/tensorflow_datasets"
    copy_bundled_corpus(data_dir)
    in_bucket = [*TINY_RUN, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(working_directory)
        assert cli.main(["train", *TINY_RUN, "--config.train.steps=4", f"--workdir={local}"]) == 0
        assert cli.main(["train", *in_bucket, "--config.train.steps=2"]) == 0
        assert cli.main(["train", *in_bucket, "--config.train.steps=4"]) == 0
    return workdir, local, working_directory


def _losses(workdir: str) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(workdir) if "loss" in record}


def test_a_run_in_a_bucket_resumes_exactly(runs):
    workdir, local, _ = runs
    assert sorted(_losses(workdir)) == [1, 2, 3, 4]
    assert _losses(workdir) == _losses(local)


def test_the_bucket_holds_the_runs_files_and_nothing_is_written_locally(runs):
    workdir, local, working_directory = runs
    run = epath.Path(workdir)
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert {"config.json", "model_config.json", "tokenizer.model", "metrics.jsonl"} <= {
        path.name for path in run.iterdir()}
    assert (run / "tokenizer.model").read_bytes() == (Path(local) / "tokenizer.model").read_bytes()
    event_files = list((run / "tensorboard").iterdir())
    assert len(event_files) == 2  # one per run
    assert all(b"loss" in events.read_bytes() for events in event_files)
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")  # the figures drawn at the end
    assert list(working_directory.iterdir()) == []


def test_a_bucket_workdir_loads_as_the_trained_model(runs):
    workdir, local, _ = runs
    from_bucket, from_disk = load_pretrained(workdir), load_pretrained(local)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(from_bucket, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(from_disk, nnx.Param)))
    assert load_tokenizer(workdir).vocab_size == 4096


def test_a_dataset_is_not_built_in_a_bucket(bucket):
    with pytest.raises(sources.DataError, match="a dataset is built in a local data_dir"):
        sources.bundled_dataset("shakespeare_safety", f"{bucket}/empty_data_dir")


def test_a_growing_bucket_file_is_uploaded_at_most_every_interval_and_on_close(bucket):
    path = epath.Path(f"{bucket}/growing.jsonl")
    growing = storage.BucketFile(path, seconds_between_uploads=3600)
    growing.write("first\n")
    growing.flush()
    growing.write("second\n")
    growing.flush()  # within the hour: not uploaded again
    assert path.read_text() == "first\n"
    growing.close()
    assert path.read_text() == "first\nsecond\n"
