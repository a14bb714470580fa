"""The training loop: accumulation, exact resume (SIGTERM and Ctrl-C included), resume on another
mesh, extending a finished run on its schedule."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from llama2_jax.metrics import read_metrics
from llama2_jax.model.config import LlamaConfig
from llama2_jax.sharding import batch_sharding, create_model, logical_context, make_mesh
from llama2_jax.data.text import next_token_spec
from llama2_jax.train.loop import train
from llama2_jax.train.losses import make_next_token_loss
from llama2_jax.train.optim import make_optimizer
from llama2_jax.train.state import init_train_state, split_params, train_state_shardings
from llama2_jax.train.step import make_train_step
from llama2_jax.train.task import Task

MODEL = LlamaConfig(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
    max_seq_len=32, compute_dtype="float32",
)
BATCH, SEQ_LEN, STEPS = 8, 16, 6


class SyntheticBatches:
    """Deterministic packed batches by position, resumable, with uneven loss weights.

    `signals`: {batch position: signals} sent to this process when that batch is drawn (a
    preemption, or Ctrl-C, mid-run)."""

    def __init__(self, mesh, signals=None):
        self.mesh, self.position, self.signals = mesh, 0, signals or {}

    def __iter__(self):
        return self

    def __next__(self):
        for number in self.signals.get(self.position, ()):
            os.kill(os.getpid(), number)
        batch = make_batch(self.position, BATCH)
        self.position += 1
        return {name: jax.device_put(value, batch_sharding(self.mesh)) for name, value in batch.items()}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def make_batch(seed, rows):
    rng = np.random.default_rng(seed)
    # A learnable sequence: each token is the previous one plus a small step.
    starts = rng.integers(0, MODEL.vocab_size, size=(rows, 1))
    tokens = (starts + np.cumsum(rng.integers(1, 3, size=(rows, SEQ_LEN + 1)), axis=1)) % MODEL.vocab_size
    weights = (rng.random((rows, SEQ_LEN)) > 0.2).astype(np.float32)
    weights[0] = 0.0  # a padding row
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_weights": weights,
        "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (rows, SEQ_LEN)).copy(),
        "segment_ids": np.ones((rows, SEQ_LEN), np.int32),
    }


def make_config(mesh_shape=(8, 1, 1), steps=STEPS, eval_every=0, log_every=1):
    config = get_config("tiny")
    config.model.update(MODEL.to_dict())
    data, fsdp, tensor = mesh_shape
    config.mesh.update(dict(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor, dcn_data=1))
    config.optimizer.update(dict(warmup_steps=2, decay_steps=STEPS, peak_lr=1e-2))
    config.train.update(dict(
        steps=steps, global_batch_size=BATCH, seq_len=SEQ_LEN, log_every=log_every, eval_every=eval_every,
        eval_steps=2, checkpoint_every=3, keep_checkpoints=2,
    ))
    return config


def make_task(signals=None):
    return Task(
        model_config=MODEL,
        loss_fn=make_next_token_loss(),
        batch_spec=next_token_spec(SEQ_LEN),
        train_batches=lambda mesh, rules: SyntheticBatches(mesh, signals),
        eval_batches=lambda mesh, rules: (batch for _, batch in zip(range(2), SyntheticBatches(mesh))),
    )


def losses(workdir):
    return {record["step"]: record["loss"] for record in read_metrics(workdir) if "loss" in record}


def params_of(result):
    return jax.tree.map(np.asarray, jax.device_get(result.state.params))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train(make_config(eval_every=3), workdir, make_task())


def test_run_logs_checkpoints_and_learns(straight_run):
    workdir, result = straight_run
    records = read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for name in ("grad_norm", "learning_rate", "tokens_per_s", "tflops_per_device", "step_time_s"):
        assert name in train_records[-1]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]  # step 0: the model the run starts from
    # From about ln 256 = 5.55 (uniform over the vocabulary), six steps at 1e-2 take the training loss
    # down by 0.5 and the evaluation loss (the same two batches each time) by 0.9; batches differ by
    # about 0.02 at the start, so a model that learns a tenth as fast falls well short of these margins.
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.25
    evaluations = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evaluations[-1] < evaluations[0] - 0.45
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, "model_config.json"))
    assert int(result.state.step) == STEPS and not result.interrupted


def test_sigterm_between_log_steps_then_restart_resumes_exactly(straight_run, tmp_path):
    reference_dir, reference = straight_run
    workdir = str(tmp_path)
    stopped = train(make_config(log_every=5), workdir, make_task({3: [signal.SIGTERM]}))
    # SIGTERM while drawing batch 3 (step 4, logged at neither 4 nor 3): that step finishes, is saved,
    # and the run returns.
    assert stopped.interrupted and int(stopped.state.step) == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
    assert losses(workdir) == {}
    # A crash after step 5 was logged but before it was saved leaves a line past the restored step.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics:
        metrics.write('{"step": 5, "loss": 99.0}\n{"step": 5, "eval_loss": 99.0}\n')
    resumed = train(make_config(log_every=5), workdir, make_task())
    expected = losses(reference_dir)
    assert [(r["step"], r.get("loss")) for r in read_metrics(workdir)] == [(5, expected[5]), (6, expected[6])]
    jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(reference))


@pytest.fixture
def terminal_ctrl_c():
    """SIGINT handled as in a terminal, by Python's default handler, whatever this process inherited
    (a job started in the background by a non-interactive shell begins with SIGINT ignored)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_saves_at_the_step_it_stopped_and_a_rerun_continues_exactly(straight_run, tmp_path,
                                                                           terminal_ctrl_c):
    reference_dir, reference = straight_run
    workdir = str(tmp_path)
    stopped = train(make_config(), workdir, make_task({4: [signal.SIGINT]}))
    assert stopped.interrupted and int(stopped.state.step) == 5
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5"]
    resumed = train(make_config(), workdir, make_task())
    assert losses(workdir) == losses(reference_dir)
    jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(reference))


def test_a_second_ctrl_c_aborts_at_once(tmp_path, terminal_ctrl_c):
    with pytest.raises(KeyboardInterrupt):
        # Both presses while one batch is drawn: the second lands before the next step boundary.
        train(make_config(), str(tmp_path), make_task({1: [signal.SIGINT, signal.SIGINT]}))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def learning_rates(workdir):
    return {record["step"]: record["learning_rate"] for record in read_metrics(workdir) if "loss" in record}


def test_extending_a_finished_run_keeps_its_schedule_unless_asked(tmp_path, caplog):
    workdir = str(tmp_path / "extended")
    first = make_config(steps=4)
    first.optimizer.decay_steps = 0  # the schedule is the run's length: 4 steps
    train(first, workdir, make_task())
    longer = make_config(steps=6)
    longer.optimizer.decay_steps = 0
    with caplog.at_level(logging.WARNING):
        train(longer, workdir, make_task())
    assert "keeping it" in caplog.text
    rates = learning_rates(workdir)
    end_lr = first.optimizer.peak_lr * first.optimizer.end_lr_fraction
    np.testing.assert_allclose([rates[5], rates[6]], [end_lr, end_lr], rtol=1e-6)
    # Asked for explicitly, the schedule is stretched to 8 steps from where the run is.
    stretched_dir = str(tmp_path / "stretched")
    train(first, stretched_dir, make_task())
    stretched = make_config(steps=6)
    stretched.optimizer.decay_steps = 8
    train(stretched, stretched_dir, make_task())
    assert learning_rates(stretched_dir)[5] > end_lr * 1.5


def test_checkpoint_from_one_mesh_resumes_on_another(straight_run, tmp_path):
    reference_dir, _ = straight_run  # mesh (8, 1, 1)
    workdir = str(tmp_path)
    train(make_config((2, 2, 2), steps=STEPS // 2), workdir, make_task())
    result = train(make_config((1, 8, 1)), workdir, make_task())
    assert dict(result.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    expected, got = losses(reference_dir), losses(workdir)
    assert got.keys() == expected.keys()
    # Other meshes add up in another order: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch():
    # Each micro-batch takes rows from every data-parallel device, with uneven loss weights.
    mesh = make_mesh(dict(ici_data=2, ici_fsdp=4, ici_tensor=1, dcn_data=1))
    config = make_config((2, 4, 1))
    optimizer, schedule = make_optimizer(config.optimizer, STEPS)
    rules = tuple(config.rules)
    model = create_model(MODEL, mesh, rules, seed=0)
    graphdef, params, frozen = split_params(model)
    shardings = train_state_shardings(nnx.state(model), optimizer, mesh, rules)
    rows = 32
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in make_batch(7, rows).items()}
    results = {}
    with logical_context(mesh, rules):
        for micro_batches in (1, 4):
            step = jax.jit(make_train_step(graphdef, make_next_token_loss(), optimizer, schedule, micro_batches))
            state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, shardings)
            results[micro_batches] = step(state, batch, frozen)
    (one_state, one_metrics), (four_state, four_metrics) = results[1], results[4]
    for name in ("loss", "grad_norm", "weight"):
        np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(four_state.params), jax.device_get(one_state.params))
