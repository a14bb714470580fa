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


def _teacher_forced(model, answers, sampling):
    """Per answer: its log-probs by one full forward pass over prompt and answer, and the
    smallest lead by which each of its tokens won the draw its key gives (logits / temperature plus
    the key's Gumbel noise, or the logits alone when greedy); asserts each token won its draw."""
    width = model.config.max_seq_len
    tokens = np.zeros((len(answers), width), np.int32)
    for row, answer in enumerate(answers):
        sequence = PROMPTS[answer.prompt] + list(answer.tokens)
        tokens[row, :len(sequence)] = sequence
    logits = np.asarray(jax.jit(lambda t: model(t, segment_ids=(t != 0).astype(jnp.int32)))(tokens))
    seed_key = jax.random.key(SEED)
    noise = jax.jit(jax.vmap(lambda p, k, t: jax.random.gumbel(
        jax.random.fold_in(generate.answer_key(seed_key, p, k), t), (model.config.vocab_size,))))
    log_probs, margin = [], np.inf
    for row, answer in enumerate(answers):
        start, count = len(PROMPTS[answer.prompt]) - 1, len(answer.tokens)
        step_logits = logits[row, start:start + count]
        log_probs.append(np.asarray(jax.nn.log_softmax(step_logits))[np.arange(count), answer.tokens])
        scores = step_logits
        if sampling.temperature > 0:
            steps = np.arange(count)
            scores = step_logits / sampling.temperature + np.asarray(
                noise(np.full(count, answer.prompt), np.full(count, answer.sample), steps))
        assert scores.argmax(-1).tolist() == list(answer.tokens), answer
        top_two = np.sort(scores, axis=-1)[:, -2:]
        margin = min(margin, float((top_two[:, 1] - top_two[:, 0]).min()))
    return log_probs, margin


def _check_against_static(answers, static, eos_id):
    assert [(c.prompt, c.sample) for c in answers] == [(p, k) for p in range(len(PROMPTS)) for k in range(K)]
    assert [list(c.tokens) for c in answers] == static.token_lists()
    log_probs = np.asarray(static.log_probs)
    for row, answer in enumerate(answers):
        np.testing.assert_allclose(answer.log_probs, log_probs[row, :len(answer.tokens)], rtol=0,
                                   atol=LOG_PROB_TOLERANCE)
        assert answer.finished == (answer.tokens[-1] == eos_id)
    lengths = [len(c.tokens) for c in answers]
    # EOS ends answers at varied lengths, and some run to the limit: slots are refilled at many steps.
    assert len(set(lengths)) >= 3 and NEW in lengths and min(lengths) < NEW // 2, lengths


@pytest.mark.parametrize("name", ["greedy", "sampled"])
@pytest.mark.parametrize("slots", [2, 3, 8])
def test_continuous_gives_the_static_tokens_for_any_slot_count(model, eos_ids, static, name, slots):
    sampling = GREEDY if name == "greedy" else SAMPLED
    answers = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids[name],
                                slots=slots, sampling=sampling, seed=SEED)
    _check_against_static(answers, static[name], eos_ids[name])
    if slots == 3:  # once per sampling: the tokens are the draws their keys give, by more than MARGIN
        log_probs, margin = _teacher_forced(model, answers, sampling)
        assert margin >= MARGIN, "a draw is a near-tie: choose another seed or prompts"
        for answer, expected in zip(answers, log_probs):
            np.testing.assert_allclose(answer.log_probs, expected, rtol=0, atol=LOG_PROB_TOLERANCE)


def test_static_answers_do_not_depend_on_their_batch(model, eos_ids, static):
    together = _static(model, SAMPLED, eos_ids["sampled"], batches=((0, 5),))
    assert together.token_lists() == static["sampled"].token_lists()
    # Without prompt ids a row keeps its old key, fold_in(seed, row): other answers.
    plain = generate.generate(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                              sampling=SAMPLED, seed=SEED)
    assert plain.token_lists() != together.token_lists()


def test_prompts_answered_in_parts_with_their_ids_give_the_answers_of_one_call(model, eos_ids, static):
    parts = [(0, 2), (2, len(PROMPTS))]
    answers = [answer for start, stop in parts for answer in engine.sample(
        model, PROMPTS[start:stop], samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"], slots=3,
        sampling=SAMPLED, seed=SEED, prompt_ids=list(range(start, stop)))]
    assert [list(answer.tokens) for answer in answers] == static["sampled"].token_lists()
    alone = engine.sample(model, PROMPTS[2:], samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"], slots=3,
                          sampling=SAMPLED, seed=SEED)
    assert [list(answer.tokens) for answer in alone] != static["sampled"].token_lists()[2 * K:]  # ids matter


def test_refilling_several_slots_at_once_changes_no_answer(model, eos_ids, static):
    answers = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=4, refill_at=3, sampling=SAMPLED, seed=SEED)
    _check_against_static(answers, static["sampled"], eos_ids["sampled"])


def test_prefix_rows_fewer_than_the_prompts_a_refill_needs_change_no_answer(model, eos_ids, static, monkeypatch):
    # Two prefix rows for 8 slots of 3 samples: a refill starts what the rows hold, the next one
    # prefills the following prompts once the rows are free.
    monkeypatch.setattr(engine, "MAX_PREFIXES", 2)
    answers = engine.sample(model, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=8, sampling=SAMPLED, seed=SEED)
    _check_against_static(answers, static["sampled"], eos_ids["sampled"])


def test_slots_split_over_a_sharded_mesh(model, eos_ids, static):
    mesh = sharding.make_mesh({"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2, "dcn_data": 1})
    sharded = sharding.create_model(model.config, mesh)
    sharded.output.kernel[...] = sharded.output.kernel[...] * 30
    before = engine._compiled_decode._cache_size()
    # 3 slots become 4, one per (data, fsdp) shard.
    answers = engine.sample(sharded, PROMPTS, samples=K, max_new_tokens=NEW, eos_id=eos_ids["sampled"],
                                slots=3, sampling=SAMPLED, seed=SEED)
    _check_against_static(answers, static["sampled"], eos_ids["sampled"])
    # One decoding program for the call, whatever the number of refills.
    assert engine._compiled_decode._cache_size() == before + 1


def test_bad_arguments_get_clear_errors(model):
    with pytest.raises(ValueError, match="must be >= 1"):
        engine.sample(model, PROMPTS, samples=0, max_new_tokens=4, eos_id=2, slots=2)
    with pytest.raises(ValueError, match="no prompts"):
        engine.sample(model, [], samples=1, max_new_tokens=4, eos_id=2, slots=2)
    with pytest.raises(ValueError, match="prompt_ids must give one non-negative index per prompt"):
        generate.generate(model, PROMPTS, max_new_tokens=4, eos_id=2, prompt_ids=[0, 1])


def test_the_sampler_answers_in_resumable_parts_as_in_one_call_and_follows_its_policy(model, eos_ids, static,
                                                                                     monkeypatch):
    from llama2_jax.rollout import sampler as sampler_lib

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    sampler = sampler_lib.Sampler(model, mesh, sharding.DEFAULT_RULES)
    keywords = dict(samples=K, sampling=SAMPLED, max_new_tokens=NEW, eos_id=eos_ids["sampled"], seed=SEED)
    whole, _, _ = sampler.sample(PROMPTS, slots=4, **keywords)
    expected = static["sampled"].token_lists()
    assert [(a.prompt, a.sample) for a in whole] == [(p, k) for p in range(len(PROMPTS)) for k in range(K)]
    assert [list(a.tokens) for a in whole] == expected
    # Parts of two slot-loads, each saved; a rerun takes the saved parts as they are.
    monkeypatch.setattr(sampler_lib, "PART_LOADS", 2)
    saved = {}
    parted, _, stopped = sampler.sample(PROMPTS, slots=3, resumable=True, saved=saved.get,
                                        save=lambda part, answers, seconds: saved.__setitem__(part, (answers, seconds)),
                                        **keywords)
    assert not stopped and len(saved) == 3 and [list(a.tokens) for a in parted] == expected
    again, _, _ = sampler.sample(PROMPTS, slots=3, resumable=True, saved=saved.get, **keywords)
    assert again == parted
    # After `update` the sampler decodes the new weights.
    copy = sharding.create_model(model.config, mesh)
    copy.output.kernel[...] = -model.output.kernel[...]
    sampler.update(copy)
    assert [list(a.tokens) for a in sampler.sample(PROMPTS, slots=4, **keywords)[0]] != expected


def test_complete_and_the_generate_command_answer_every_prompt_in_order(tmp_path):
    import json

    from llama2_jax import cli
    from llama2_jax.checkpoint.convert import export_model
    from llama2_jax.data.tokenizer import Tokenizer
    from llama2_jax.model.llama import Llama
    from llama2_jax.rollout.sampler import answers_to_dialogs
    from flax import nnx

    tokenizer = Tokenizer()
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", n_layers=2, max_seq_len=64)
    policy = Llama(config, rngs=nnx.Rngs(0))
    dialogs = [[{"role": "user", "content": text}] for text in ("Who are you?", "Speak.", "Name a play of yours.")]
    texts = answers_to_dialogs(policy, tokenizer, dialogs, max_new_tokens=5, samples=2, batch_size=3,
                               sampling=SAMPLED, seed=1)
    assert [len(group) for group in texts] == [2, 2, 2] and all(isinstance(t, str) for g in texts for t in g)
    export_model(policy, str(tmp_path / "policy"), "orbax", tokenizer_path=str(tokenizer.path))
    (tmp_path / "prompts.txt").write_text("Once upon a time\nTo be\nThe king\n")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.txt"),
                     "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [record["prompt"] for record in records] == ["Once upon a time", "To be", "The king"]
    for record in records:
        assert 1 <= len(record["tokens"]) == len(record["log_probs"]) <= 6
        assert record["finished"] == (record["tokens"][-1] == tokenizer.eos_id)
