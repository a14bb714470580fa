"""Eight simulated CPU devices, so every mesh shape in the tests is real; fixtures several test files
share."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny model pretrained for 30 steps, the initial checkpoint of the fine-tuning stages' tests
    (read, never written)."""
    from llama2_jax import cli

    workdir = tmp_path_factory.mktemp("pretrained")
    assert cli.main(["train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}", "--config.train.steps=30",
                     "--config.train.eval_every=0", "--config.train.sample_length=0", "--config.train.log_every=10",
                     "--config.train.seq_len=128"]) == 0
    return workdir


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """A random two-layer tiny policy (seed 0) and helpfulness and safety reward models (seeds 1 and
    2), with the bundled tokenizer: where the sampling stages' tests start (read, never written)."""
    from flax import nnx

    from llama2_jax.checkpoint.convert import export_model
    from llama2_jax.data.tokenizer import Tokenizer
    from llama2_jax.model.config import LlamaConfig
    from llama2_jax.model.llama import Llama, LlamaRewardModel

    root = tmp_path_factory.mktemp("random_models")
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2)
    for name, model in (("policy", Llama(config, rngs=nnx.Rngs(0))),
                        ("helpfulness", LlamaRewardModel(config, rngs=nnx.Rngs(1))),
                        ("safety", LlamaRewardModel(config, rngs=nnx.Rngs(2)))):
        export_model(model, str(root / name), "orbax", tokenizer_path=str(Tokenizer().path))
    return root


QUICK_PIPELINE = "--config=configs/pipeline.py:tiny,quick"  # as tests/test_pipeline.py runs it


@pytest.fixture(scope="session")
def quick_pipeline(tmp_path_factory):
    """`python -m llama2_jax pipeline` on its quick config (every stage a few steps of a two-layer
    model), run to its end in this process: tests/test_pipeline.py checks it and starts its reruns
    from copies, the notebook's test starts its own run of the same config from one (read, never
    written)."""
    from llama2_jax import cli

    workdir = tmp_path_factory.mktemp("quick_pipeline")
    assert cli.main(["pipeline", QUICK_PIPELINE, f"--workdir={workdir}"]) == 0
    return workdir


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache for the session, empty at its start: the many runs of the same tiny
    stages (a run and its resumed twin, one stage's several bad-input runs) compile each program once.
    A cache hit runs the program XLA compiled before for the same computation, so no result changes."""
    import jax

    directory = tmp_path_factory.mktemp("jax_compilation_cache")
    previous = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                             "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    yield directory
    for name, value in previous.items():
        jax.config.update(name, value)
