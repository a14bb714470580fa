"""Sampling with a KV cache, a batch at a time: the static path `chat` streams from and under the
continuous batching of llama2_jax/rollout/ (its prefill, sampling, keys and decoding layout).

A call takes a batch of prompts of different lengths, left-pads them to a common bucket length,
runs the whole prompt through the model once (prefill), then decodes one token per step inside a
single `jax.lax.while_loop` until every row has produced EOS or the token limit is reached. With
`samples` K, a prompt is prefilled once and its KV cache copied to its K rows.

What a decoding step reads, it reads once: each layer has a KV buffer of its own, heads before
slots, written in place (`llama.KVCache`), and the layers run one after another over weights
unstacked once into the decoding layout, where a scan over stacked layers would copy a layer's
cache and weights out on every token. The prefill computes the logits of the last position only.
`python -m llama2_jax bench generate` shows where a step's time goes on any backend.

Compilation happens once per bucket, not per prompt: the batch, the prompt length and the number of
new tokens are each rounded up to a power of two (the real limit is a runtime value), so a stream
of prompts of varying lengths reuses a handful of programs.

Sampling layout: the model's parameters are copied once into a decoding layout — layers unstacked,
fsdp sharding dropped, tensor sharding kept, matmul weights already in the compute dtype — used for
the whole call and released when it returns. With fsdp-sharded weights every single token would all-gather the
entire model; the paper reports sampling ~20× slower until it gathered weights once per batch.

Log-probabilities: `log_probs[b, t]` is log p(token | prefix) under the model itself (the raw
log-softmax of the logits: temperature 1, no top-k/top-p), whatever the sampling settings. That is
what PPO's ratio and KL terms need, and it equals a teacher-forced forward pass over the same tokens.

Reproducibility: each row draws from its own key, `fold_in(fold_in(seed, row), step)`, so a row's
sample depends on its seed, prompt and position in the batch, not on the bucket sizes. Given the
prompts' indices (`prompt_ids`), answer k of prompt p draws from `answer_key(seed, p, k)` instead:
its tokens then depend on (seed, prompt, sample) alone, not on the batch it ran in, and equal what
the continuous-batching engine (rollout/engine.py) draws for the same answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from llama2_jax import sharding
from llama2_jax.model import axes, llama, lora

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens per prompt; positions at or past `lengths[b]` hold PAD_ID and log-prob 0.

    `tokens` [batch, max_new_tokens] int32; `log_probs` [batch, max_new_tokens] float32 (see the
    module docstring); `lengths` [batch] int32, the number of new tokens, EOS included when produced.
    """

    tokens: jax.Array
    log_probs: jax.Array
    lengths: jax.Array

    def token_lists(self) -> list[list[int]]:
        """The new tokens of each row as Python lists, cut at each row's length (on every process)."""
        tokens, lengths = to_host(self.tokens), to_host(self.lengths)
        return [row[:length].tolist() for row, length in zip(tokens, lengths)]


def to_host(array: jax.Array) -> np.ndarray:
    """A global array as numpy on every process, even when its rows live on other hosts."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def sample_tokens(
    logits: jax.Array, keys: jax.Array, sampling: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [batch] from float32 `logits` [batch, vocab], one key per row, and their model log-probs."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0:
        tokens = first_argmax(logits)
    else:
        tokens = jax.vmap(lambda row, key: _sample_row(row, key, sampling))(logits, keys)
    # log p(token) = logit - logsumexp: two reductions over the vocabulary, no log-softmax written out.
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(logits, axis=-1)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (the first index of the maximum), as two plain reductions:
    XLA's CPU backend runs argmax's paired (value, index) reduction several times slower, which
    shows in every decoding step over a 32k vocabulary."""
    top = jnp.max(x, axis=-1, keepdims=True)
    size = x.shape[-1]
    return jnp.min(jnp.where(x == top, jnp.arange(size, dtype=jnp.int32), size), axis=-1).astype(jnp.int32)


def _sample_row(logits: jax.Array, key: jax.Array, sampling: SamplingParams) -> jax.Array:
    scaled = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k == 0 and sampling.top_p == 1:
        return _categorical(key, scaled)
    # Candidates sorted by probability: the top k, or the whole vocabulary for top-p alone.
    count = min(sampling.top_k or scaled.shape[-1], scaled.shape[-1])
    candidate_logits, candidate_ids = jax.lax.top_k(scaled, count)
    if sampling.top_p < 1:
        # Meta's rule: keep a candidate while the probability mass before it is at most top_p.
        probs = jax.nn.softmax(candidate_logits)
        mass_before = jnp.cumsum(probs) - probs
        candidate_logits = jnp.where(mass_before > sampling.top_p, -jnp.inf, candidate_logits)
    return candidate_ids[_categorical(key, candidate_logits)].astype(jnp.int32)


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """`jax.random.categorical(key, logits)` (the same Gumbel noise, so the same draw) with
    `first_argmax`."""
    return first_argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


# ---- the decoding layout -------------------------------------------------------------------------


def model_mesh(model: nnx.Module) -> Mesh:
    """The mesh the model's parameters live on (a one-device mesh for unsharded parameters)."""
    first = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    if isinstance(first.sharding, NamedSharding):
        return first.sharding.mesh
    return sharding.make_mesh(devices=list(first.devices())[:1])


def decoding_layout(
    model: nnx.Module, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES
) -> tuple[nnx.GraphDef, nnx.State]:
    """A copy of the model's state for sampling: layers unstacked, no fsdp sharding, matmul weights
    in the compute dtype.

    Decoding runs the layers one after another (`llama.unstack_layers`), so each layer's weights
    are an array of their own rather than a slice of the stacked ones copied out on every token.
    The model casts every weight except the norm scales to its compute dtype where it is used, so
    casting them once here changes no result while halving what each decoding step reads. The copy
    is made by one compiled program straight into its shardings: no intermediate full copy.
    """
    mesh = mesh or model_mesh(model)
    model = lora.merged(model)  # adapters merged into their weights once: a step costs what it costs without
    graphdef, state = nnx.split(model)
    compute_dtype = jnp.dtype(model.config.compute_dtype)

    def cast(variable):
        if axes.NORM in (variable.get_metadata().get("logical_axes") or ()):
            return variable
        return variable.replace(variable[...].astype(compute_dtype))

    def unstacked_state(state):
        _, decoding_state = nnx.split(llama.unstack_layers(nnx.merge(graphdef, state)))
        return jax.tree.map(cast, decoding_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    decoding_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: llama.unstack_layers(nnx.merge(graphdef, state))))
    shardings = sharding.state_shardings(abstract, mesh, sharding.generation_rules(rules))
    return decoding_graphdef, jax.jit(unstacked_state, out_shardings=shardings)(state)


# ---- prompts, buckets and the compiled loop ------------------------------------------------------


def bucket(size: int, minimum: int) -> int:
    """The power of two at or above `size`, at least `minimum`: padded shapes from a few compiled programs."""
    return max(minimum, 1 << max(0, size - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Layout:
    batch: int  # padded batch
    prompt: int  # prompt slots P
    new: int  # new-token slots N; the cache holds P + N
    limit: int  # new tokens actually allowed


def _plan(prompt_lengths: list[int], max_new_tokens: int, context: int, batch_shards: int) -> _Layout:
    longest = max(prompt_lengths)
    if longest >= context:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room in the model's context of {context} tokens; "
            "shorten the prompt (chat drops the oldest turns for you)"
        )
    # Round the prompt up to a power of two only while that leaves room for the new tokens.
    prompt = max(longest, min(bucket(longest, MIN_PROMPT_BUCKET), context - max_new_tokens))
    new = min(bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET), context - prompt)
    batch = bucket(len(prompt_lengths), 1)
    batch = -(-batch // batch_shards) * batch_shards
    return _Layout(batch=batch, prompt=prompt, new=new, limit=min(max_new_tokens, new))


def _prompt_arrays(prompts: Sequence[Sequence[int]], layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded tokens [batch, P] and lengths [batch]; padding rows hold one PAD token."""
    tokens = np.full((layout.batch, layout.prompt), PAD_ID, np.int32)
    lengths = np.ones((layout.batch,), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, layout.prompt - len(prompt):] = prompt
        lengths[row] = len(prompt)
    return tokens, lengths


def _row_keys(seed: int, batch: int) -> jax.Array:
    return jax.vmap(lambda row: jax.random.fold_in(jax.random.key(seed), row))(jnp.arange(batch))


def answer_key(seed_key: jax.Array, prompt: jax.Array, sample: jax.Array) -> jax.Array:
    """The key of answer `sample` to prompt `prompt` (its token t draws from `fold_in(key, t)`), from
    `jax.random.key(seed)`: the same whatever row, batch or slot the answer is sampled in."""
    return jax.random.fold_in(jax.random.fold_in(seed_key, prompt), sample)


def _answer_row_keys(seed: int, prompt_ids: Sequence[int], batch: int, samples: int) -> jax.Array:
    """Row keys of a batch whose rows `i * samples + k` are answer k of prompt `prompt_ids[i]`;
    padding rows (past the prompts) get the keys of prompt 0, and are never read."""
    prompts = np.zeros(batch, np.int32)
    prompts[:len(prompt_ids)] = prompt_ids
    rows_prompt = jnp.asarray(np.repeat(prompts, samples))
    rows_sample = jnp.asarray(np.tile(np.arange(samples, dtype=np.int32), batch))
    return jax.vmap(answer_key, (None, 0, 0))(jax.random.key(seed), rows_prompt, rows_sample)


def _prefill(graphdef, state, tokens, lengths, row_keys, sampling, cache_length, samples):
    """Runs the left-padded prompts once, then gives each of a prompt's `samples` rows (prompt i
    owns rows i * samples … i * samples + samples - 1) a copy of its cache and its own first token."""
    model = nnx.merge(graphdef, state)
    batch, prompt_slots = tokens.shape
    padding = prompt_slots - lengths
    slots = jnp.arange(prompt_slots)[None, :]
    segment_ids = (slots >= padding[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - padding[:, None], 0)
    cache = _constrain_cache(model.init_cache(batch, cache_length))
    logits, cache = model.prefill(tokens, positions, segment_ids, cache)
    if samples > 1:
        cache = _constrain_cache(cache.repeat(samples))
        logits = jnp.repeat(logits, samples, axis=0)
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, 0)
    with jax.named_scope("sampling"):
        token, log_prob = sample_tokens(logits, keys, sampling)
    return token, log_prob, cache


def _constrain_cache(cache: llama.KVCache) -> llama.KVCache:
    kv_names = (axes.BATCH, axes.ACT_KV_HEADS, axes.LENGTH, None)
    constrain = lambda buffers: tuple(axes.constrain(buffer, kv_names) for buffer in buffers)  # noqa: E731
    return cache.replace(keys=constrain(cache.keys), values=constrain(cache.values))


def _decode_step(graphdef, state, token, lengths, step, cache, row_keys, sampling):
    """Feeds new token `step - 1` of every row and samples token `step`."""
    model = nnx.merge(graphdef, state)
    positions = (lengths + step - 1)[:, None]
    segment_ids = jnp.ones_like(positions)
    logits, cache = model.decode(token[:, None], positions, segment_ids, cache)
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    with jax.named_scope("sampling"):
        token, log_prob = sample_tokens(logits, keys, sampling)
    return token, log_prob, cache


def _generate_loop(graphdef, state, tokens, lengths, active, limit, row_keys, *, sampling, eos_id, new_slots,
                   samples):
    prompt_slots = tokens.shape[1]
    token, log_prob, cache = _prefill(
        graphdef, state, tokens, lengths, row_keys, sampling, prompt_slots + new_slots, samples
    )
    lengths, active = jnp.repeat(lengths, samples), jnp.repeat(active, samples)
    batch = lengths.shape[0]

    def record(carry, token, log_prob):
        step, out_tokens, out_log_probs, out_lengths, done = carry
        out_tokens = out_tokens.at[:, step].set(jnp.where(done, PAD_ID, token))
        out_log_probs = out_log_probs.at[:, step].set(jnp.where(done, 0.0, log_prob))
        out_lengths = out_lengths + (~done).astype(jnp.int32)
        done = done | (token == eos_id) | (step + 1 >= limit)
        return step + 1, out_tokens, out_log_probs, out_lengths, done

    initial = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, new_slots), PAD_ID, jnp.int32),
        jnp.zeros((batch, new_slots), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        ~active,
    )
    outputs = record(initial, token, log_prob)

    def keep_going(loop):
        (step, *_, done), _, _ = loop
        return (step < limit) & ~jnp.all(done)

    def one_token(loop):
        outputs, token, cache = loop
        token, log_prob, cache = _decode_step(
            graphdef, state, token, lengths, outputs[0], cache, row_keys, sampling
        )
        return record(outputs, token, log_prob), token, cache

    (_, out_tokens, out_log_probs, out_lengths, _), _, _ = jax.lax.while_loop(
        keep_going, one_token, (outputs, token, cache)
    )
    return out_tokens, out_log_probs, out_lengths


_compiled_loop = jax.jit(
    _generate_loop, static_argnums=(0,), static_argnames=("sampling", "eos_id", "new_slots", "samples")
)


# ---- the public entry points ---------------------------------------------------------------------


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    checked = [list(map(int, prompt)) for prompt in prompts]
    empty = [index for index, prompt in enumerate(checked) if not prompt]
    if empty:
        raise ValueError(f"prompt(s) {empty} are empty: give at least one token (e.g. BOS)")
    # An embedding lookup clamps out-of-range ids silently; a tokenizer mismatch must not.
    outside = [index for index, prompt in enumerate(checked) if min(prompt) < 0 or max(prompt) >= vocab_size]
    if outside:
        raise ValueError(
            f"prompt(s) {outside[:10]} hold token ids outside the model's vocabulary [0, {vocab_size}); "
            "was the prompt encoded with the tokenizer the model was trained with?"
        )
    return checked


def _batch_shards(mesh: Mesh, rules) -> int:
    return sharding.batch_shard_count(mesh, sharding.generation_rules(rules))


def _place(mesh: Mesh, rules, *arrays: np.ndarray) -> list[jax.Array]:
    batch = sharding.batch_sharding(mesh, sharding.generation_rules(rules))
    return [jax.make_array_from_callback(a.shape, batch, lambda index, a=a: a[index]) for a in arrays]


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    decoding_state: tuple[nnx.GraphDef, nnx.State] | None = None,
    samples: int = 1,
    prompt_ids: Sequence[int] | None = None,
) -> Generation:
    """Samples up to `max_new_tokens` after each prompt (token ids, BOS included if wanted).

    New tokens are also capped by the model's context: the longest prompt plus the new tokens never
    exceed `config.max_seq_len`. Pass `decoding_state` (from `decoding_layout`) to reuse one copy of
    the parameters across calls (chat); otherwise one is made for this call and released after it.
    Every process of a multi-host run must pass the same prompts.

    `samples` K > 1 draws K answers per prompt from one prefill of it (its KV cache copied to K
    rows): rows `i * K` … `i * K + K - 1` of the result are prompt i's. Row r draws from key
    `fold_in(seed, r)`, so the result is what the prompts repeated K times in a row would give.
    With `prompt_ids` (one non-negative index per prompt, e.g. its place in a stage's prompt list),
    answer k of prompt i draws from `answer_key(key(seed), prompt_ids[i], k)` instead: the same answer
    whatever batch it is in, and the one `rollout.engine.sample` gives for that (seed, prompt, sample).
    """
    arguments, statics, layout = _loop_arguments(
        model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, sampling=sampling, seed=seed, mesh=mesh,
        rules=rules, decoding_state=decoding_state, samples=samples, prompt_ids=prompt_ids)
    with sharding.logical_context(mesh or model_mesh(model), sharding.generation_rules(rules)):
        out_tokens, out_log_probs, out_lengths = _compiled_loop(*arguments, **statics)
    rows, columns = len(prompts) * samples, layout.limit
    return Generation(
        tokens=out_tokens[:rows, :columns],
        log_probs=out_log_probs[:rows, :columns],
        lengths=out_lengths[:rows],
    )


def compiled_program(model: nnx.Module, prompts: Sequence[Sequence[int]], **keywords) -> jax.stages.Compiled:
    """The compiled program `generate(model, prompts, **keywords)` runs: its HLO names the ops that
    a profile of the call reports (`bench generate` sorts them into matmuls, attention, …)."""
    arguments, statics, _ = _loop_arguments(model, prompts, **keywords)
    mesh = keywords.get("mesh") or model_mesh(model)
    with sharding.logical_context(mesh, sharding.generation_rules(keywords.get("rules", sharding.DEFAULT_RULES))):
        return _compiled_loop.lower(*arguments, **statics).compile()


def _loop_arguments(model, prompts, *, max_new_tokens, eos_id, sampling=SamplingParams(), seed=0, mesh=None,
                    rules=sharding.DEFAULT_RULES, decoding_state=None, samples=1, prompt_ids=None):
    """The compiled loop's arguments and static settings for a `generate` call, and its layout."""
    prompts = _check_prompts(prompts, model.config.vocab_size)
    if prompt_ids is not None and (len(prompt_ids) != len(prompts) or min(prompt_ids) < 0):
        raise ValueError(f"prompt_ids must give one non-negative index per prompt ({len(prompts)}), "
                         f"got {list(prompt_ids)[:10]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (answers per prompt), got {samples}")
    mesh = mesh or model_mesh(model)
    layout = _plan([len(p) for p in prompts], max_new_tokens, model.config.max_seq_len, _batch_shards(mesh, rules))
    tokens, lengths = _prompt_arrays(prompts, layout)
    active = np.arange(layout.batch) < len(prompts)
    graphdef, state = decoding_state or decoding_layout(model, mesh, rules)
    tokens, lengths, active = _place(mesh, rules, tokens, lengths, active)
    row_keys = (_row_keys(seed, layout.batch * samples) if prompt_ids is None
                else _answer_row_keys(seed, prompt_ids, layout.batch, samples))
    arguments = (graphdef, state, tokens, lengths, active, jnp.int32(layout.limit), row_keys)
    statics = dict(sampling=sampling, eos_id=int(eos_id), new_slots=layout.new, samples=samples)
    return arguments, statics, layout


_compiled_prefill = jax.jit(_prefill, static_argnums=(0, 5, 6, 7))
_compiled_step = jax.jit(_decode_step, static_argnums=(0, 7), donate_argnums=(5,))


def stream(
    model: nnx.Module,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    eos_id: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    decoding_state: tuple[nnx.GraphDef, nnx.State] | None = None,
) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are sampled (EOS is not yielded).

    The same prefill and decoding step as `generate`, driven from Python one token at a time so a
    terminal can print each one; the tokens equal `generate`'s for the same seed.
    """
    (prompt,) = _check_prompts([prompt], model.config.vocab_size)
    mesh = mesh or model_mesh(model)
    layout = _plan([len(prompt)], max_new_tokens, model.config.max_seq_len, _batch_shards(mesh, rules))
    tokens, lengths = _prompt_arrays([prompt], layout)
    graphdef, state = decoding_state or decoding_layout(model, mesh, rules)
    row_keys = _row_keys(seed, layout.batch)
    # The mesh and rules are entered around each call, never held across a `yield`, where they
    # would leak into the caller's code.
    context = lambda: sharding.logical_context(mesh, sharding.generation_rules(rules))  # noqa: E731
    with context():
        tokens, lengths = _place(mesh, rules, tokens, lengths)
        cache_length = layout.prompt + layout.new
        token, _, cache = _compiled_prefill(graphdef, state, tokens, lengths, row_keys, sampling, cache_length, 1)
    for step in range(1, layout.limit + 1):
        value = int(token[0])
        if value == eos_id:
            return
        yield value
        if step == layout.limit:
            return
        with context():
            token, _, cache = _compiled_step(
                graphdef, state, token, lengths, jnp.int32(step), cache, row_keys, sampling
            )
