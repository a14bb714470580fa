"""KV-cache sampling: equal to recomputing the full forward pass, on any mesh, reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import sharding
from llama2_jax.generate import (
    PAD_ID, SamplingParams, _compiled_loop, decoding_layout, generate, sample_tokens, stream,
)
from llama2_jax.model.config import LlamaConfig

from reference_decoding import decode

# Prompts whose every greedy step, and every step sampled with seed 7 at temperature 1, wins by at
# least MARGIN: separately compiled programs then agree on the tokens, which are compared exactly.
PROMPTS = [[1, 5, 6, 7], [1, 10], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
NEW = 10
NO_EOS = -1
# In logits. These float32 logits differ by ~5e-7 between programs (seen: a one-device and a sharded
# mesh, the cache and a full recompute); a near-tie closer than this could flip a token.
MARGIN = 1e-3


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=64)
    return sharding.create_model(config, sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS)


@pytest.fixture(scope="module")
def recomputed(model):
    """Greedy decoding of PROMPTS by a full forward pass per token, no near-tie on the way."""
    reference = decode(model, PROMPTS, NEW)
    assert reference.margin >= MARGIN, "a greedy step of PROMPTS is a near-tie: choose other prompts"
    return reference


def test_greedy_with_cache_equals_full_recompute_and_teacher_forced_log_probs(greedy, recomputed):
    assert greedy.tokens.shape == (len(PROMPTS), NEW)
    assert np.asarray(greedy.lengths).tolist() == [NEW] * len(PROMPTS)
    assert np.asarray(greedy.tokens).tolist() == recomputed.tokens
    np.testing.assert_allclose(np.asarray(greedy.log_probs), recomputed.log_probs, rtol=0, atol=1e-5)


def test_stops_at_eos_and_pads_after(model, greedy):
    row0 = np.asarray(greedy.tokens[0]).tolist()
    eos = row0[3]
    stop = row0.index(eos) + 1
    result = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    assert lengths[0] == stop and tokens[0, stop - 1] == eos
    assert (tokens[0, stop:] == PAD_ID).all() and (np.asarray(result.log_probs)[0, stop:] == 0).all()
    for row in (1, 2):  # the other rows run on unchanged unless they meet the same token
        reference = np.asarray(greedy.tokens[row]).tolist()
        expected = reference.index(eos) + 1 if eos in reference else NEW
        assert lengths[row] == expected
        assert tokens[row, :expected].tolist() == reference[:expected]


def test_sampling_is_reproducible_and_filters_agree_with_greedy(model, recomputed):
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    first = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, sampling=sampled, seed=7)
    again = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, sampling=sampled, seed=7)
    other = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, sampling=sampled, seed=8)
    np.testing.assert_array_equal(first.tokens, again.tokens)  # one program run twice
    assert not np.array_equal(first.tokens, other.tokens)
    # A row's draw depends on the seed, its row and the step alone, not on the rest of the batch or
    # its size: the rows sampled in a batch of three and alone are the reference's draws.
    plain = SamplingParams(temperature=1.0)
    drawn = decode(model, PROMPTS, NEW, temperature=1.0, seed=7)
    assert drawn.margin >= MARGIN, "a sampled step of PROMPTS is a near-tie: choose another seed"
    batch = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, sampling=plain, seed=7)
    alone = generate(model, PROMPTS[:1], max_new_tokens=NEW, eos_id=NO_EOS, sampling=plain, seed=7)
    assert np.asarray(batch.tokens).tolist() == drawn.tokens
    assert np.asarray(alone.tokens).tolist() == drawn.tokens[:1]
    np.testing.assert_allclose(np.asarray(batch.log_probs), drawn.log_probs, rtol=0, atol=1e-5)
    top_1 = SamplingParams(temperature=1.0, top_k=1)
    top_1_tokens = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, sampling=top_1).tokens
    assert np.asarray(top_1_tokens).tolist() == recomputed.tokens


def test_sample_tokens_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)
    sample = jax.jit(sample_tokens, static_argnums=2)
    top_k, _ = sample(logits, keys, SamplingParams(temperature=1.0, top_k=2))
    assert set(np.asarray(top_k).tolist()) == {0, 1}
    top_p, log_probs = sample(logits, keys, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(np.asarray(top_p).tolist()) == {0, 1}  # mass before token 2 is 0.8 > 0.7
    # Log-probs are the model's own, whatever the filter: log 0.5 and log 0.3.
    np.testing.assert_allclose(np.asarray(log_probs), np.asarray(logits[0, top_p]), rtol=1e-5)
    counts = np.bincount(np.asarray(top_p), minlength=4) / 2000
    np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.04)


def test_stream_yields_the_same_tokens_as_generate(model, greedy, recomputed):
    streamed = list(stream(model, PROMPTS[2], max_new_tokens=NEW, eos_id=NO_EOS))
    # Exact across programs (stream's prefill and step, generate's loop): no step of PROMPTS is a near-tie.
    assert streamed == np.asarray(greedy.tokens[2]).tolist() == recomputed.tokens[2]


def test_one_compilation_per_bucket(model, greedy):
    before = _compiled_loop._cache_size()
    # Prompts of 17 to 32 tokens, 9 to 16 new tokens and 3 or 4 rows share one program with `greedy`.
    generate(model, [[1, 2, 3], [4] * 30, [6, 7]], max_new_tokens=NEW - 1, eos_id=NO_EOS)
    generate(model, [[1] * 20, [2] * 3, [4], [5]], max_new_tokens=NEW + 6, eos_id=NO_EOS)
    assert _compiled_loop._cache_size() == before


def test_decoding_layout_drops_fsdp_and_casts_matmul_weights():
    config = LlamaConfig.from_preset("tiny")  # bfloat16 compute, float32 parameters
    mesh = sharding.make_mesh({"ici_fsdp": 4, "ici_tensor": 2, "dcn_data": 1})
    model = sharding.create_model(config, mesh)
    _, state = decoding_layout(model)
    flat = dict((".".join(map(str, path)), variable[...]) for path, variable in nnx.to_flat_state(state))
    for name, array in flat.items():
        assert "fsdp" not in jax.tree.leaves(tuple(array.sharding.spec)), name
        expected = jnp.float32 if name.endswith("norm.scale") else jnp.bfloat16
        assert array.dtype == expected, name
    assert flat["layers.0.attention.wq"].sharding.spec[1] == "tensor"  # layers unstacked for decoding
    assert model.layers.attention.wq[...].sharding.spec[1] == "fsdp"


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_same_greedy_tokens_on_a_sharded_mesh(model, greedy, recomputed, mesh_shape):
    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh({"ici_data": data, "ici_fsdp": fsdp, "ici_tensor": tensor, "dcn_data": 1})
    sharded = sharding.create_model(model.config, mesh)
    # The same seed gives the same weights, from another init program: up to rounding (weights are
    # ~0.02; another seed's differ by that much).
    for name, array in sharding.model_arrays(sharded).items():
        np.testing.assert_allclose(array, sharding.model_arrays(model)[name], rtol=1e-6, atol=1e-7, err_msg=name)
    result = generate(sharded, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS)
    assert np.asarray(result.tokens).tolist() == recomputed.tokens  # no step of PROMPTS is a near-tie
    np.testing.assert_allclose(result.log_probs, greedy.log_probs, rtol=0, atol=1e-5)


def test_bad_prompts_get_clear_errors(model):
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], max_new_tokens=4, eos_id=2)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] are empty"):
        generate(model, [[1, 2], []], max_new_tokens=4, eos_id=2)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] hold token ids outside the model's vocabulary \[0, 4096\)"):
        generate(model, [[1, 4096]], max_new_tokens=4, eos_id=2)
    with pytest.raises(ValueError, match="leaves no room in the model's context of 64"):
        generate(model, [[1] * 64], max_new_tokens=4, eos_id=2)


def test_new_tokens_are_capped_by_the_context(model):
    result = generate(model, [[1] * 60], max_new_tokens=20, eos_id=NO_EOS)
    assert result.tokens.shape == (1, 4) and int(result.lengths[0]) == 4
