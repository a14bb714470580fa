"""The model against formulas: sizes, norms, rotary embeddings, attention masks, cache, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax.model import Llama, LlamaConfig, LlamaRewardModel, param_count
from llama2_jax.model.attention import check_available, xla_attention
from llama2_jax.model.config import REMAT_POLICIES, ffn_hidden_dim
from llama2_jax.model.llama import RMSNorm, unstack_layers
from llama2_jax.model.rope import apply_rope

PAPER_SIZES = {  # PAPER.md: FFN hidden width and exact parameter counts.
    "7b": (11008, 6_738_415_616),
    "13b": (13824, 13_015_864_320),
    "34b": (22016, 33_743_970_304),
    "70b": (28672, 68_976_648_192),
}

TINY = LlamaConfig.from_preset("tiny", vocab_size=256, n_layers=2, compute_dtype="float32")


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_paper_sizes_have_the_papers_ffn_width_and_parameter_count(size):
    config = LlamaConfig.from_preset(size)
    ffn, count = PAPER_SIZES[size]
    assert config.ffn_dim == ffn
    assert param_count(config) == count
    assert (config.vocab_size, config.head_dim, config.max_seq_len) == (32000, 128, 4096)
    assert (config.norm_eps, config.rope_theta) == (1e-5, 10000.0)


def test_ffn_rounding_rule():
    assert ffn_hidden_dim(4096, 256, None) == 11008
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672


def test_hf_config_round_trip_reproduces_the_ffn_width():
    for size in PAPER_SIZES:
        config = LlamaConfig.from_preset(size)
        again = LlamaConfig.from_hf_config(config.to_hf_config())
        assert again.ffn_dim == config.ffn_dim
    odd = LlamaConfig.from_hf_config(
        dict(hidden_size=96, intermediate_size=250, num_hidden_layers=1, num_attention_heads=4,
             vocab_size=10)
    )
    assert odd.ffn_dim == 250


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=6), "not divisible by n_heads"),
        (dict(n_kv_heads=3), "not a multiple of n_kv_heads"),
        (dict(attention="flash"), "attention="),
        (dict(remat="some"), "remat="),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_preset("tiny", **overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*7b"):
        LlamaConfig.from_preset("huge")


def test_kernel_on_the_wrong_platform_is_refused():
    with pytest.raises(ValueError, match="runs only on GPU"):
        check_available("cudnn", "cpu")
    with pytest.raises(ValueError, match="runs only on TPU"):
        check_available("splash", "cpu")
    check_available("xla", "cpu")


def test_rmsnorm_matches_float64_formula():
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 5
    norm = RMSNorm(16, 1e-5, TINY)
    norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    weight = np.linspace(0.5, 1.5, 16)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_rope_matches_the_rotation_formula_at_explicit_positions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
    positions = np.array([[0, 5, 1, 300]])
    half = 4
    freqs = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    expected = np.empty_like(x, dtype=np.float64)
    for t, p in enumerate(positions[0]):
        angle = p * freqs
        a, b = x[0, t, :, :half], x[0, t, :, half:]
        expected[0, t, :, :half] = a * np.cos(angle) - b * np.sin(angle)
        expected[0, t, :, half:] = b * np.cos(angle) + a * np.sin(angle)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_matches_float64_reference():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    segments = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    out = xla_attention(*map(jnp.asarray, (q, k, v, segments, segments)))
    k_rep, v_rep = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # head h uses kv head h // 2
    expected = np.zeros_like(q, dtype=np.float64)
    for b in range(2):
        for h in range(4):
            for t in range(5):
                keys = [s for s in range(t + 1) if segments[b, s] == segments[b, t]]
                scores = np.array([q[b, t, h] @ k_rep[b, s, h] for s in keys]) / np.sqrt(8)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                expected[b, t, h] = sum(w * v_rep[b, s, h] for w, s in zip(weights, keys))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_see_each_other():
    model = nnx.jit(Llama(TINY, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(3)
    first, second = rng.integers(0, 256, (1, 7)), rng.integers(0, 256, (1, 5))
    packed = jnp.asarray(np.concatenate([first, second], axis=1))
    segment_ids = jnp.asarray([[1] * 7 + [2] * 5])
    positions = jnp.asarray([list(range(7)) + list(range(5))])
    together = model(packed, positions, segment_ids)
    np.testing.assert_allclose(together[:, :7], model(jnp.asarray(first)), atol=1e-5)
    np.testing.assert_allclose(together[:, 7:], model(jnp.asarray(second)), atol=1e-5)


@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "unstacked"])
def test_cached_decoding_equals_the_full_forward_pass(unstacked):
    model = Llama(TINY.replace(n_kv_heads=2), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    full = model(tokens)
    decoder = unstack_layers(model) if unstacked else model
    cache = decoder.init_cache(2, 16)
    ones = lambda n: jnp.ones((2, n), jnp.int32)  # noqa: E731
    decode = nnx.jit(lambda model, *args: model.decode(*args))
    prefill = nnx.jit(lambda model, *args: model.prefill(*args))
    logits, cache = prefill(decoder, tokens[:, :6], jnp.arange(6)[None].repeat(2, 0), ones(6), cache)
    steps = [logits]  # the prompt's last position only
    for t in range(6, 10):
        logits, cache = decode(decoder, tokens[:, t : t + 1], jnp.full((2, 1), t), ones(1), cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.stack(steps, axis=1), full[:, 5:], atol=1e-5)
    # One buffer per layer, kv heads only, heads before slots.
    assert len(cache.keys) == TINY.n_layers
    assert cache.keys[0].shape == (2, 2, 16, TINY.head_dim)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.init_cache(1, TINY.max_seq_len + 1)


def test_every_remat_policy_gives_the_same_gradients_with_less_memory():
    config = TINY.replace(vocab_size=64, compute_dtype="float32")
    tokens = jax.random.randint(jax.random.key(2), (4, 128), 0, 64)
    gradients, temporaries = {}, {}
    for remat in REMAT_POLICIES:  # every policy the config accepts
        graphdef, params = nnx.split(Llama(config.replace(remat=remat), rngs=nnx.Rngs(0)))
        gradient = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).mean()))
        gradients[remat] = gradient(params)
        temporaries[remat] = gradient.lower(params).compile().memory_analysis().temp_size_in_bytes
    for remat in REMAT_POLICIES:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), gradients["none"], gradients[remat])
    # Keeping less of the forward pass needs less memory for the backward pass.
    assert temporaries["full"] < temporaries["minimal"] < temporaries["save_dots"] < temporaries["none"]


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    config = TINY.replace(max_seq_len=1024, compute_dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(0))
    # Sharper attention than at initialisation, where it is nearly uniform and hides position errors.
    model.layers.attention.wq[...] *= 4
    model.layers.attention.wk[...] *= 4
    same_weights = nnx.eval_shape(lambda: Llama(config.replace(compute_dtype="float32"), rngs=nnx.Rngs(0)))
    nnx.update(same_weights, nnx.state(model))
    models = {"bfloat16": model, "float32": same_weights}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 64)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(960, 1024), tokens.shape)  # the end of a long context
    logits = {dtype: nnx.jit(lambda model: model(tokens, positions))(model) for dtype, model in models.items()}
    assert logits["bfloat16"].dtype == jnp.float32
    assert models["bfloat16"].layers.attention.wq[...].dtype == jnp.float32
    # bfloat16 keeps 8 significant bits: every matmul input is rounded by up to 2^-9 of itself, and the
    # logits (up to 1 here) move by up to 0.006. A position error moves them by a tenth and more (rotary
    # angles in bfloat16, which holds only every fourth whole number between 512 and 1024).
    np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.02)


def test_reward_head_reads_the_last_non_padding_token():
    model = LlamaRewardModel(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    segment_ids = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    positions = jnp.asarray([[0, 1, 2, 0, 0], [0, 0, 0, 1, 2]])
    scores = model(tokens, positions, segment_ids)
    assert scores.shape == (2,)
    hidden = model.hidden_states(tokens, positions, segment_ids)
    kernel = model.score.kernel[...][:, 0]
    # A score is a sum of dim terms: two programs agree to the terms' scale, however small the sum.
    terms = float(np.abs(hidden[0, 2]) @ np.abs(kernel))
    np.testing.assert_allclose(scores[0], hidden[0, 2] @ kernel, rtol=1e-5, atol=1e-5 * terms)
    np.testing.assert_allclose(scores[1], hidden[1, 4] @ kernel, rtol=1e-5, atol=1e-5 * terms)
    # Same sequence, padded on either side: same score.
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4 * terms)


def test_splash_kernel_matches_reference_on_a_sharded_mesh():
    """The TPU kernel, run by the Pallas interpreter, inside shard_map on a (2, 2, 2) mesh."""
    from llama2_jax import sharding
    from llama2_jax.model.attention import splash_attention

    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(4, 128, 4, 128)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(4, 128, 2, 128)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(4, 128, 2, 128)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], 4, axis=0), jnp.int32)
    expected = xla_attention(q, k, v, segment_ids, segment_ids)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2, 1, 1, 1))
    with sharding.logical_context(mesh):
        out = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, segment_ids)
    np.testing.assert_allclose(out, expected, atol=2e-5)
