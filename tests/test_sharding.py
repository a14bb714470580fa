"""Sharding changes where numbers live, never what they are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import sharding
from llama2_jax.model import LlamaConfig

CONFIG = LlamaConfig.from_preset(
    "tiny", vocab_size=256, n_layers=2, n_heads=8, n_kv_heads=4, compute_dtype="float32"
)
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _mesh(data, fsdp, tensor):
    config = sharding.MeshConfig(data, fsdp, tensor, 1, 1, 1)
    return sharding.make_mesh(config, jax.devices()[: data * fsdp * tensor])


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 16))
    segment_ids = np.repeat([[1] * 10 + [2] * 6], 8, axis=0)
    positions = np.repeat([list(range(10)) + list(range(6))], 8, axis=0)
    return tuple(jnp.asarray(a, jnp.int32) for a in (tokens, positions, segment_ids))


def _logits_loss_and_grads(mesh_shape):
    mesh = _mesh(*mesh_shape)
    model = sharding.create_model(CONFIG, mesh, seed=0)
    graphdef, params = nnx.split(model)
    tokens, positions, segment_ids = jax.device_put(_batch(), sharding.batch_sharding(mesh))

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        target = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
        return -target.mean(), logits

    with sharding.logical_context(mesh):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return np.asarray(logits), float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def reference():
    return _logits_loss_and_grads((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", MESHES[1:])
def test_logits_loss_and_gradients_agree_across_meshes(reference, mesh_shape):
    logits, loss, grads = _logits_loss_and_grads(mesh_shape)
    ref_logits, ref_loss, ref_grads = reference
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert abs(loss - ref_loss) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_each_device_holds_only_its_fraction_of_a_sharded_weight():
    mesh = _mesh(2, 2, 2)
    model = sharding.create_model(CONFIG, mesh)
    wq = model.layers.attention.wq[...]  # [layers, embed→fsdp, q_heads→tensor, head_dim]
    layers, dim, heads, head_dim = wq.shape
    assert len(wq.addressable_shards) == 8
    pieces = set()
    for shard in wq.addressable_shards:
        assert shard.data.shape == (layers, dim // 2, heads // 2, head_dim)
        pieces.add(tuple((s.start or 0) for s in shard.index))
    assert len(pieces) == 4  # fsdp × tensor distinct pieces, each held by 2 data replicas
    full = np.asarray(wq)
    for shard in wq.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_mesh_fills_its_one_unknown_axis():
    mesh = sharding.make_mesh(sharding.MeshConfig(ici_data=2, ici_fsdp=-1, ici_tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.make_mesh(sharding.MeshConfig(ici_data=-1, ici_fsdp=-1))
    with pytest.raises(ValueError, match="needs 12 devices but there are 8"):
        sharding.make_mesh(sharding.MeshConfig(ici_data=3, ici_fsdp=4, ici_tensor=1))


def test_heads_not_divisible_by_the_tensor_axis_are_refused():
    config = CONFIG.replace(n_heads=4, n_kv_heads=2, vocab_size=256)
    with pytest.raises(ValueError, match=r"kv_heads=2 is not divisible by mesh axes \('tensor',\)"):
        sharding.create_model(config, _mesh(1, 2, 4))


def test_loading_arrays_of_the_wrong_shape_names_the_tensor():
    mesh = _mesh(1, 1, 1)
    arrays = sharding.model_arrays(sharding.create_model(CONFIG, mesh))
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    reloaded = sharding.model_from_arrays(CONFIG, _mesh(1, 2, 4), arrays)
    np.testing.assert_array_equal(reloaded.norm.scale[...], arrays["norm.scale"])
    arrays["layers.feed_forward.w2"] = arrays["layers.feed_forward.w2"][:, :-1]
    with pytest.raises(ValueError, match="layers.feed_forward.w2 has shape .* expects"):
        sharding.model_from_arrays(CONFIG, mesh, arrays)


def test_generation_rules_keep_tensor_but_drop_fsdp():
    rules = dict(sharding.generation_rules())
    assert rules["embed"] is None and rules["q_heads"] == "tensor"
    assert rules["residual_length"] is None  # decoding steps are one token long
    assert rules["batch"] == ("data", "fsdp")


def test_sequence_parallelism_splits_what_remat_keeps_over_the_tensor_devices():
    # With remat `full` each block keeps only its input, the residual stream: [rows, length, dim]
    # per layer. Split by length over 2 tensor devices, each device keeps half of it.
    from llama2_jax.commands import aot
    from llama2_jax.config_cli import parse_config_flags
    from llama2_jax.model import axes

    layers, length, dim = 16, 1024, 512
    config, _ = parse_config_flags([
        "--config=configs/pretrain.py:tiny", "--config.train.global_batch_size=4",
        f"--config.train.seq_len={length}", f"--config.model.n_layers={layers}", f"--config.model.dim={dim}",
        "--config.model.remat=full", "--config.mesh.ici_data=1", "--config.mesh.ici_fsdp=4",
        "--config.mesh.ici_tensor=2",
    ])

    def temporaries(rules):
        config.rules = rules
        compiled = aot.stage_steps(config, jax.devices()).lower_train_step().compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole = tuple((name, None if name == axes.RESIDUAL_LENGTH else mesh_axes)
                  for name, mesh_axes in sharding.DEFAULT_RULES)
    stream_per_device = layers * 1 * length * dim * 2  # one bfloat16 row per fsdp device
    saved = temporaries(whole) - temporaries(sharding.DEFAULT_RULES)
    assert saved >= 0.75 * stream_per_device / 2, (saved, stream_per_device)


def test_a_length_the_tensor_devices_do_not_divide_gives_the_same_logits():
    # Sequence parallelism splits the stream by length; a 3-token prompt on 2 devices is padded.
    mesh = _mesh(1, 4, 2)
    model = sharding.create_model(CONFIG, mesh, seed=0)
    reference = sharding.create_model(CONFIG, _mesh(1, 1, 1), seed=0)
    tokens = jnp.asarray(np.arange(3 * 8).reshape(8, 3) % 256, jnp.int32)
    with sharding.logical_context(mesh):
        logits = jax.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference(tokens)), rtol=1e-5, atol=1e-5)


def test_reward_scores_agree_across_meshes():
    # The scored token is gathered from a stream that sequence parallelism splits by length.
    from llama2_jax.model.llama import LlamaRewardModel

    tokens, positions, segment_ids = _batch()
    segment_ids = segment_ids.at[:, -3:].set(0)  # right padding: the scored token is not the last column
    scores = {}
    for mesh_shape in [(1, 1, 1), (1, 2, 4), (2, 2, 2)]:
        mesh = _mesh(*mesh_shape)
        model = sharding.create_model(CONFIG, mesh, seed=0, model_class=LlamaRewardModel)
        with sharding.logical_context(mesh):
            scores[mesh_shape] = np.asarray(jax.jit(lambda m, *a: m(*a))(model, tokens, positions, segment_ids))
    np.testing.assert_allclose(scores[(1, 2, 4)], scores[(1, 1, 1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores[(2, 2, 2)], scores[(1, 1, 1)], rtol=1e-5, atol=1e-5)
