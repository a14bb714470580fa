"""What makes sampling fast keeps its results: K samples from one shared prefill, the unstacked
decoding layout, and the profile `bench generate` sorts by op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import sharding
from llama2_jax.commands import bench, bench_generate
from llama2_jax.generate import SamplingParams, compiled_program, decoding_layout, generate
from llama2_jax.model import LlamaConfig

CONFIG = LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=128)


@pytest.fixture(scope="module")
def model():
    return sharding.create_model(CONFIG, sharding.make_mesh(devices=jax.devices()[:1]), seed=3)


def test_samples_from_one_prefill_equal_the_prompts_repeated(model):
    prompts = [[1, 17, 42, 9], [1, 5], [1, 200, 3, 77, 31, 8]]
    keywords = dict(max_new_tokens=12, eos_id=-1, sampling=SamplingParams(temperature=1.0), seed=7)
    shared = generate(model, prompts, samples=3, **keywords)
    repeated = generate(model, [prompt for prompt in prompts for _ in range(3)], **keywords)
    # Two compiled programs (prefill batch 4 then 12 rows, against 16 rows), the same row keys: a
    # draw could differ only if float rounding moved a logit across a Gumbel-max boundary, a
    # chance of about 1e-6 per token at these magnitudes.
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_allclose(shared.log_probs, repeated.log_probs, atol=1e-5)
    tokens = np.asarray(shared.tokens)
    assert len({tuple(row) for row in tokens[:3]}) == 3  # a prompt's samples differ from each other


def test_the_decoding_layout_holds_one_array_per_layer_and_the_same_weights(model):
    graphdef, state = decoding_layout(model)
    stacked = np.asarray(model.layers.feed_forward.w2[...])
    for layer in range(CONFIG.n_layers):
        np.testing.assert_array_equal(state["layers"][layer]["feed_forward"]["w2"][...], stacked[layer])


def test_samples_must_be_positive(model):
    with pytest.raises(ValueError, match="samples must be >= 1"):
        generate(model, [[1, 2]], max_new_tokens=2, eos_id=-1, samples=0)


def test_the_profile_sorts_every_op_of_a_decoding_step(model):
    program = compiled_program(model, [[1, 2, 3]], max_new_tokens=4, eos_id=-1)
    categories = bench_generate.op_categories(program.as_text())
    in_step = {category for category, in_loop in categories.values() if in_loop}
    in_prefill = {category for category, in_loop in categories.values() if not in_loop}
    assert {"matmuls", "attention", "cache_write", "sampling"} <= in_step
    assert {"matmuls", "attention", "cache_write"} <= in_prefill


def test_matmul_parameters_count_every_weight_but_the_embedding_and_norms(model):
    _, state = decoding_layout(model)
    dim, ffn, layers, vocab = CONFIG.dim, CONFIG.ffn_dim, CONFIG.n_layers, CONFIG.vocab_size
    heads, kv_heads, head_dim = CONFIG.n_heads, CONFIG.n_kv_heads, CONFIG.head_dim
    per_layer = dim * head_dim * (2 * heads + 2 * kv_heads) + 3 * dim * ffn
    assert bench_generate.matmul_parameters(state) == layers * per_layer + dim * vocab


def test_bench_generate_prints_the_breakdown_and_shared_prefill(capsys):
    assert bench.main(["generate", "--shape", "tiny", "--batch", "2", "--prompt-length", "8",
                       "--new-tokens", "4", "--repeats", "1", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "ms per decoding step" in printed and "KV cache" in printed
    assert "per step (profiled, ms): matmuls" in printed
    assert "samples/s with one prefill per prompt" in printed
