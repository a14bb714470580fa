"""Continuous batching: every (prompt, sample) answered once, with the tokens the static sampler
draws for it, whatever the number of slots, and the log-probs a teacher-forced pass gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax import generate, sharding
from llama2_jax.generate import SamplingParams
from llama2_jax.model.config import LlamaConfig
from llama2_jax.rollout import engine

# Prompts of 2 to 17 tokens; three answers each.
PROMPTS = [[1, 5, 6, 7], [1, 10], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [1, 99, 98],
           [1, 2000, 3000, 40, 7, 7, 7]]
K = 3
NEW = 16
SEED = 7
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)
# Separately compiled programs agree on these float32 logits to ~1e-5 (they reach ~±10 here); a
# chosen token that wins by less than this could flip between them. Every draw below wins by more
# (the teacher-forced check measures it).
MARGIN = 1e-3
LOG_PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    """The tiny model with its output weights scaled 30×: logits spread over ±10 rather than ±0.3,
    so a temperature-1 answer repeats some tokens (one of them serves as EOS) instead of drawing
    4096 near-equal tokens, and near-ties between the top choices are rare."""
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=64)
    model = sharding.create_model(config, sharding.make_mesh(devices=jax.devices()[:1]))
    model.output.kernel[...] = model.output.kernel[...] * 30
    return model


@pytest.fixture(scope="module")
def eos_ids(model):
    """Per sampling: the token the answers without EOS reach most often, so that with it as EOS
    answers end at varied lengths (some at once, some at the limit)."""
    chosen = {}
    for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
        rows = _static(model, sampling, eos_id=-1).token_lists()
        counts = np.bincount([token for row in rows for token in set(row)])
        chosen[name] = int(np.argmax(counts))
    return chosen


def _static(model, sampling, eos_id, batches=((0, 2), (2, 5))):
    """The static sampler, prompts in the given batches, each answer keyed by (seed, prompt, sample)."""
    outputs = [generate.generate(model, PROMPTS[start:stop], samples=K, max_new_tokens=NEW, eos_id=eos_id,
                                 sampling=sampling, seed=SEED, prompt_ids=list(range(start, stop)))
               for start, stop in batches]
    return generate.Generation(*(jnp.concatenate([getattr(output, field) for output in outputs])
                                 for field in ("tokens", "log_probs", "lengths")))


@pytest.fixture(scope="module")
def static(model, eos_ids):
    return {name: _static(model, sampling, eos_ids[name])
            for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED))}


def _teacher_forced(model, completions, sampling):
    """Per completion: its log-probs by one full forward pass over prompt and answer, and the
    smallest lead by which each of its tokens won the draw its key gives (logits / temperature plus
    the key's Gumbel noise, or the logits alone when greedy); asserts each token won its draw."""
    width = model.config.max_seq_len
    tokens = np.zeros((len(completions), width), np.int32)
    for row, completion in enumerate(completions):
        sequence = PROMPTS[completion.prompt] + completion.tokens
        tokens[row, :len(sequence)] = sequence
    logits = np.asarray(jax.jit(lambda t: model(t, segment_ids=(t != 0).astype(jnp.int32)))(tokens))
    seed_key = jax.random.key(SEED)
    noise = jax.jit(jax.vmap(lambda p, k, t: jax.random.gumbel(
        jax.random.fold_in(generate.answer_key(seed_key, p, k), t), (model.config.vocab_size,))))
    log_probs, margin = [], np.inf
    for row, completion in enumerate(completions):
        start, count = len(PROMPTS[completion.prompt]) - 1, len(completion.tokens)
        step_logits = logits[row, start:start + count]
        log_probs.append(np.asarray(jax.nn.log_softmax(step_logits))[np.arange(count), completion.tokens])
        scores = step_logits
        if sampling.temperature > 0:
            steps = np.arange(count)
            scores = step_logits / sampling.temperature + np.asarray(
                noise(np.full(count, completion.prompt), np.full(count, completion.sample), steps))
        assert scores.argmax(-1).tolist() == completion.tokens, completion
        top_two = np.sort(scores, axis=-1)[:, -2:]
        margin = min(margin, float((top_two[:, 1] - top_two[:, 0]).min()))
    return log_probs, margin


def _check_against_static(completions, static, eos_id):
    assert [(c.prompt, c.sample) for c in completions] == [(p, k) for p in range(len(PROMPTS)) for k in range(K)]
    assert [c.tokens for c in completions] == static.token_lists()
    log_probs = np.asarray(static.log_probs)
    for row, completion in enumerate(completions):
        np.testing.assert_allclose(completion.log_probs, log_probs[row, :len(completion.tokens)], rtol=0,
                                   atol=LOG_PROB_TOLERANCE)
        assert completion.finished == (completion.tokens[-1] == eos_id)
    lengths = [len(c.tokens) for c in completions]
    # EOS ends answers at varied lengths, and some run to the limit: slots are refilled at many steps.
    assert len(set(lengths)) >= 3 and NEW in lengths and min(lengths) < NEW // 2, lengths


@pytest.mark.parametrize("name", ["greedy", "sampled"])
@pytest.mark.parametrize("slots", [2, 3, 8])
def test_continuous_gives_the_static_tokens_for_any_slot_count(model, eos_ids, static, name, slots):
    sampling = GREEDY if name == "greedy" else SAMPLED
    completions = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids[name],
                                slots=slots, sampling=sampling, seed=SEED)
    _check_against_static(completions, static[name], eos_ids[name])
    if slots == 3:  # once per sampling: the tokens are the draws their keys give, by more than MARGIN
        log_probs, margin = _teacher_forced(model, completions, sampling)
        assert margin >= MARGIN, "a draw is a near-tie: choose another seed or prompts"
        for completion, expected in zip(completions, log_probs):
            np.testing.assert_allclose(completion.log_probs, expected, rtol=0, atol=LOG_PROB_TOLERANCE)


def test_static_answers_do_not_depend_on_their_batch(model, eos_ids, static):
    together = _static(model, SAMPLED, eos_ids["sampled"], batches=((0, 5),))
    assert together.token_lists() == static["sampled"].token_lists()
    # Without prompt ids a row keeps its old key, fold_in(seed, row): other answers.
    plain = generate.generate(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                              sampling=SAMPLED, seed=SEED)
    assert plain.token_lists() != together.token_lists()


def test_refilling_several_slots_at_once_changes_no_answer(model, eos_ids, static):
    completions = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=4, refill_at=3, sampling=SAMPLED, seed=SEED)
    _check_against_static(completions, static["sampled"], eos_ids["sampled"])


def test_prefix_rows_fewer_than_the_prompts_a_refill_needs_change_no_answer(model, eos_ids, static, monkeypatch):
    # Two prefix rows for 8 slots of 3 samples: a refill starts what the rows hold, the next one
    # prefills the following prompts once the rows are free.
    monkeypatch.setattr(engine, "MAX_PREFIXES", 2)
    completions = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=8, sampling=SAMPLED, seed=SEED)
    _check_against_static(completions, static["sampled"], eos_ids["sampled"])


def test_slots_split_over_a_sharded_mesh(model, eos_ids, static):
    mesh = sharding.make_mesh({"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2, "dcn_data": 1})
    sharded = sharding.create_model(model.config, mesh)
    sharded.output.kernel[...] = sharded.output.kernel[...] * 30
    before = engine._compiled_decode._cache_size()
    # 3 slots become 4, one per (data, fsdp) shard.
    completions = engine.sample(sharded, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=3, sampling=SAMPLED, seed=SEED)
    _check_against_static(completions, static["sampled"], eos_ids["sampled"])
    # One decoding program for the call, whatever the number of refills.
    assert engine._compiled_decode._cache_size() == before + 1


def test_bad_arguments_get_clear_errors(model):
    with pytest.raises(ValueError, match="must be >= 1"):
        engine.sample(model, PROMPTS, samples=0, max_new_tokens=4, eos_id=2, slots=2)
    with pytest.raises(ValueError, match="no prompts"):
        engine.sample(model, [], samples=1, max_new_tokens=4, eos_id=2, slots=2)
    with pytest.raises(ValueError, match="prompt_ids must give one non-negative index per prompt"):
        generate.generate(model, PROMPTS, max_new_tokens=4, eos_id=2, prompt_ids=[0, 1])
