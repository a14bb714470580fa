"""Continuous batching: a fixed number of slots decode together, and a slot whose answer ended
takes the next waiting (prompt, sample) at once, rather than idling until the batch's longest
answer is done.

`generate.generate` decodes a batch until its last row ends: with EOS on, most rows finish early
and sit idle while the longest answer goes on, and the next batch waits for all of them. Here each
slot (a row of the KV cache) has its own cache index, position and attention mask
(`llama.KVCache` with a per-row `index`), so slots can be at any point of different answers. The
host decides what goes where; the device runs two programs, each compiled once per bucket:

    _insert   when the next answer's prompt is not prefilled yet, prefills the next prompts in
              line together (left-padded to their own bucket) into the prefix rows that are
              free; then writes each starting slot's cache rows [0, P) from its prompt's prefix
              and draws the answer's first token
    _decode   decodes every slot, one token per step inside a `jax.lax.while_loop`, until
              `refill_at` slots have ended (or, with nothing left to start, until all have)

The K samples of a prompt share one prefill: a prompt's prefix (`_Prefixes`, one row per prompt)
stays on the device until all its samples have started. Prompts start shortest first (a batch
prefilled together then needs little padding), each prompt's samples one after another; the
completions come back in (prompt, sample) order.
P, the prompt area every slot has, is the longest prompt rounded up to a multiple of PROMPT_STEP;
N, the answer area, is the static path's bucket of `max_new_tokens`.

Randomness: answer k of prompt p draws its token t from `fold_in(generate.answer_key(key(seed), p,
k), t)`, whatever slot it runs in and whenever it starts. `generate.generate(..., prompt_ids=...)`
draws from the same keys, so the two give the same tokens up to float rounding between separately
compiled programs (a token can differ only where two candidates' Gumbel-perturbed scores are within
~1e-6 of each other).

On GPU and TPU. Slots are rows of one batch: they are split over the data and fsdp mesh axes as
the static path's rows are (`generate.decoding_layout`'s shardings: weights without fsdp, tensor
sharding kept; cache rows over (data, fsdp), kv heads over tensor), so `slots` is rounded up to a
multiple of the data × fsdp device count, and each device decodes `slots / (data × fsdp)` rows.
The KV cache holds every slot's whole context, P + N cache slots:

    slots × n_layers × 2 × n_kv_heads × (P + N) × head_dim × bytes of the compute dtype

e.g. 7B (32 layers, 32 kv heads, head_dim 128, bfloat16) with P + N = 1024: 0.5 GiB per slot,
64 slots 32 GiB, split over the batch devices (and over tensor by kv heads). The prefixes add
R × n_layers × 2 × n_kv_heads × P × head_dim × bytes, R = the power of two at or above
slots / K + 1 (at most MAX_PREFIXES, a multiple of the batch devices), split the same way. Size the slots to what
a device holds beside the weights: more slots give more rows per step, which is what a decoding
step's time barely grows with until the matmuls become compute-bound (hundreds of rows on an
H100 or a TPU v5 chip). The cache is written in place (the programs donate it); each step writes
one slot per row with a scatter. A round trip to the host happens only when `refill_at` answers
ended: raise it to amortise dispatch over more steps when slots are many and answers short.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from llama2_jax import generate, sharding
from llama2_jax.generate import PAD_ID, SamplingParams
from llama2_jax.model import axes, llama


@dataclasses.dataclass(frozen=True)
class Answer:
    """Answer `sample` to prompt `prompt` (its index in the prompts given): its new tokens (EOS
    included when produced), whether it ended with EOS rather than at the token limit, and the
    tokens' log-probs under the model (temperature 1, no filters, as `generate.Generation.log_probs`;
    empty where they were not kept)."""

    prompt: int
    sample: int
    tokens: tuple[int, ...]
    finished: bool
    log_probs: tuple[float, ...] = ()

    def text(self, tokenizer) -> str:
        """The answer as text: EOS dropped, surrounding spaces stripped."""
        return tokenizer.decode(list(self.tokens[:-1] if self.finished else self.tokens)).strip()


@struct.dataclass
class _Slots:
    """What the device keeps of every slot between programs; arrays are [slots] unless noted."""

    cache: llama.KVCache  # with a per-row index
    token: jax.Array  # the last token drawn, fed at the next step
    prompt_length: jax.Array  # the prompt's real length: answer token t sits at position length + t
    prompt: jax.Array  # the answer's (prompt, sample), which give its key
    sample: jax.Array
    step: jax.Array  # new tokens drawn so far
    done: jax.Array  # the answer ended (or the slot holds none)
    tokens: jax.Array  # [slots, N] the answer's new tokens, PAD_ID past `step`
    log_probs: jax.Array  # [slots, N]


@struct.dataclass
class _Prefixes:
    """Prompts prefilled ahead of their answers, one per row, until every sample of the prompt has
    started: cache rows [0, P) per layer [rows, kv_heads, P, head_dim], their segment ids [rows, P]
    and the logits of each prompt's last token [rows, vocab]."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segment_ids: jax.Array
    logits: jax.Array


def _constrain_slots(slots: _Slots) -> _Slots:
    """Slots split over the batch axes, as the static path's rows."""
    rows = lambda array: axes.constrain(array, (axes.BATCH,) + (None,) * (array.ndim - 1))  # noqa: E731
    cache = generate._constrain_cache(slots.cache)
    cache = cache.replace(segment_ids=rows(cache.segment_ids), index=rows(cache.index))
    fields = {name: rows(getattr(slots, name)) for name in
              ("token", "prompt_length", "prompt", "sample", "step", "done", "tokens", "log_probs")}
    return slots.replace(cache=cache, **fields)


def _constrain_prefixes(prefixes: _Prefixes) -> _Prefixes:
    """Prefix rows split over the batch axes, as the slots' cache rows."""
    kv_names = (axes.BATCH, axes.ACT_KV_HEADS, axes.LENGTH, None)
    constrain = lambda buffers: tuple(axes.constrain(buffer, kv_names) for buffer in buffers)  # noqa: E731
    return prefixes.replace(keys=constrain(prefixes.keys), values=constrain(prefixes.values),
                            segment_ids=axes.constrain(prefixes.segment_ids, (axes.BATCH, None)),
                            logits=axes.constrain(prefixes.logits, (axes.BATCH, None)))


def _empty(graphdef, state, slot_count: int, prompt_slots: int, new_slots: int,
           prefix_count: int) -> tuple[_Slots, _Prefixes]:
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(slot_count, prompt_slots + new_slots, per_row_index=True)
    zeros = jnp.zeros((slot_count,), jnp.int32)
    slots = _Slots(cache=cache, token=zeros, prompt_length=zeros, prompt=zeros, sample=zeros, step=zeros,
                   done=jnp.ones((slot_count,), bool), tokens=jnp.full((slot_count, new_slots), PAD_ID, jnp.int32),
                   log_probs=jnp.zeros((slot_count, new_slots), jnp.float32))
    prefix_cache = model.init_cache(prefix_count, prompt_slots)
    prefixes = _Prefixes(keys=prefix_cache.keys, values=prefix_cache.values, segment_ids=prefix_cache.segment_ids,
                         logits=jnp.zeros((prefix_count, model.config.vocab_size), jnp.float32))
    return _constrain_slots(slots), _constrain_prefixes(prefixes)


def _insert(graphdef, state, slots: _Slots, prefixes: _Prefixes, tokens, lengths, rows, started, source, prompt,
            sample, prompt_length, seed_key, limit, *, sampling: SamplingParams, eos_id: int):
    """Prefills the left-padded prompts `tokens` [M, P'] (P' <= P, the bucket of the longest; None
    for no prefill) into prefix rows `rows` [M], then starts an answer in each slot of `started`
    [R] from prefix row `source` [R]: `prompt`, `sample`, `prompt_length` [R] name its answer.
    Entries past the end of the prefixes or the slots are padding: their writes are dropped. Only
    the started slots' rows are read and written; the rest of the cache stays in place."""
    model = nnx.merge(graphdef, state)
    prompt_slots = prefixes.segment_ids.shape[1]
    if tokens is not None:
        prefixes = _constrain_prefixes(_prefill(model, prefixes, tokens, lengths, rows))
    pool = prefixes
    new_slots = slots.tokens.shape[1]
    keys = jax.vmap(generate.answer_key, (None, 0, 0))(seed_key, prompt, sample)
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
    with jax.named_scope("sampling"):
        first, log_prob = generate.sample_tokens(pool.logits[source], keys, sampling)
    first_column = jnp.arange(new_slots)[None, :] == 0
    put = lambda buffer, rows: buffer.at[started].set(rows.astype(buffer.dtype), mode="drop")  # noqa: E731
    put_prefix = lambda buffer, prefix: buffer.at[started, :, :prompt_slots].set(  # noqa: E731
        prefix[source].astype(buffer.dtype), mode="drop")
    cache = slots.cache
    answer_segments = jnp.zeros((source.shape[0], new_slots), jnp.int32)
    cache = cache.replace(
        keys=tuple(map(put_prefix, cache.keys, pool.keys)),
        values=tuple(map(put_prefix, cache.values, pool.values)),
        segment_ids=put(cache.segment_ids, jnp.concatenate([pool.segment_ids[source], answer_segments], axis=1)),
        index=put(cache.index, jnp.full(source.shape, prompt_slots)),
    )
    slots = slots.replace(
        cache=cache,
        token=put(slots.token, first),
        prompt_length=put(slots.prompt_length, prompt_length),
        prompt=put(slots.prompt, prompt),
        sample=put(slots.sample, sample),
        step=put(slots.step, jnp.ones_like(first)),
        done=put(slots.done, (first == eos_id) | (limit <= 1)),
        tokens=put(slots.tokens, jnp.where(first_column, first[:, None], PAD_ID)),
        log_probs=put(slots.log_probs, jnp.where(first_column, log_prob[:, None], 0.0)),
    )
    return _constrain_slots(slots), prefixes


def _prefill(model, prefixes: _Prefixes, tokens, lengths, rows) -> _Prefixes:
    """`prefixes` with the prefill of each of `tokens` in row `rows[m]`, left-padded from P' to P slots."""
    count, length = tokens.shape
    padding = length - lengths
    columns = jnp.arange(length)[None, :]
    segment_ids = (columns >= padding[:, None]).astype(jnp.int32)
    positions = jnp.maximum(columns - padding[:, None], 0)
    cache = generate._constrain_cache(model.init_cache(count, length))
    logits, cache = model.prefill(tokens, positions, segment_ids, cache)
    extra = prefixes.segment_ids.shape[1] - length  # empty slots before the prompt, segment id 0
    put = lambda buffer, new: buffer.at[rows].set(new.astype(buffer.dtype), mode="drop")  # noqa: E731
    pad = lambda prefix: jnp.pad(prefix, ((0, 0), (0, 0), (extra, 0), (0, 0)))  # noqa: E731
    return _Prefixes(
        keys=tuple(put(old, pad(new)) for old, new in zip(prefixes.keys, cache.keys)),
        values=tuple(put(old, pad(new)) for old, new in zip(prefixes.values, cache.values)),
        segment_ids=put(prefixes.segment_ids, jnp.pad(segment_ids, ((0, 0), (extra, 0)))),
        logits=put(prefixes.logits, logits),
    )


def _decode(graphdef, state, slots: _Slots, seed_key, limit, refill_at, *, sampling: SamplingParams, eos_id: int):
    """Decodes every slot until `refill_at` of them are done or all are: each live slot feeds its
    last token and draws the next; a done slot's row is computed and thrown away."""
    model = nnx.merge(graphdef, state)
    slot_count, new_slots = slots.tokens.shape
    answer_keys = jax.vmap(generate.answer_key, (None, 0, 0))(seed_key, slots.prompt, slots.sample)
    all_rows = jnp.arange(slot_count)

    def keep_going(slots):
        ended = jnp.sum(slots.done.astype(jnp.int32))
        return (ended < refill_at) & (ended < slot_count)

    def one_token(slots):
        positions = (slots.prompt_length + slots.step - 1)[:, None]
        live = ~slots.done
        logits, cache = model.decode(slots.token[:, None], positions, jnp.ones_like(positions), slots.cache)
        keys = jax.vmap(jax.random.fold_in)(answer_keys, slots.step)
        with jax.named_scope("sampling"):
            token, log_prob = generate.sample_tokens(logits, keys, sampling)
        column = jnp.where(live, slots.step, new_slots)  # a done slot's column is out of range: dropped
        step = slots.step + live.astype(jnp.int32)
        return slots.replace(
            # A done slot stays at its index: its rows are rewritten when it starts its next answer.
            cache=cache.replace(index=jnp.where(live, cache.index, slots.cache.index)),
            token=jnp.where(live, token, slots.token),
            step=step,
            done=slots.done | (token == eos_id) | (step >= limit),
            tokens=slots.tokens.at[all_rows, column].set(token, mode="drop"),
            log_probs=slots.log_probs.at[all_rows, column].set(log_prob, mode="drop"),
        )

    return _constrain_slots(jax.lax.while_loop(keep_going, one_token, slots))


_STATICS = ("sampling", "eos_id")
_compiled_empty = jax.jit(_empty, static_argnums=(0, 2, 3, 4, 5))
_compiled_insert = jax.jit(_insert, static_argnums=(0,), static_argnames=_STATICS, donate_argnums=(2, 3))
_compiled_decode = jax.jit(_decode, static_argnums=(0,), static_argnames=_STATICS, donate_argnums=(2,))


# ---- the host loop -------------------------------------------------------------------------------

# The prompt area P is the longest prompt rounded up to a multiple of this (see `_plan`).
PROMPT_STEP = 32
# The most prompts prefilled ahead of their answers: their prefixes take MAX_PREFIXES × P cache slots.
MAX_PREFIXES = 32


def sample(
    model: nnx.Module,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    samples: int,
    max_new_tokens: int,
    eos_id: int,
    slots: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    refill_at: int = 1,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    decoding_state: tuple[nnx.GraphDef, nnx.State] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> list[Answer]:
    """`samples` answers to every prompt (token ids), decoded `slots` at a time; the answers in
    (prompt, sample) order: entry `p * samples + k` is answer k to prompt p.

    Answer k to prompt p is the one `generate.generate(..., seed=seed, prompt_ids=[..., p, ...])`
    gives (see the module docstring); with `prompt_ids`, prompt p draws as prompt `prompt_ids[p]`
    (its place in a larger set answered in several calls, say), whatever call it is answered in. Decoding returns to the host, to start waiting answers, once
    `refill_at` slots have ended. New tokens are capped by the context as in `generate.generate`:
    the longest prompt plus the new tokens never exceed `config.max_seq_len`. Pass `decoding_state`
    (from `generate.decoding_layout`) to reuse one copy of the parameters across calls.
    """
    prompts = generate._check_prompts(prompt_tokens, model.config.vocab_size)
    if samples < 1 or max_new_tokens < 1 or slots < 1 or refill_at < 1:
        raise ValueError(f"samples, max_new_tokens, slots and refill_at must be >= 1, got {samples}, "
                         f"{max_new_tokens}, {slots}, {refill_at}")
    key_ids = list(range(len(prompts))) if prompt_ids is None else [int(index) for index in prompt_ids]
    if len(key_ids) != len(prompts) or min(key_ids) < 0:
        raise ValueError(f"give one non-negative prompt id per prompt: {len(key_ids)} ids for {len(prompts)} prompts")
    mesh = mesh or generate.model_mesh(model)
    shards = generate._batch_shards(mesh, rules)
    layout = _plan(max(map(len, prompts)), max_new_tokens, model.config.max_seq_len)
    slot_count = -(-slots // shards) * shards
    graphdef, state = decoding_state or generate.decoding_layout(model, mesh, rules)
    seed_key = jax.random.key(seed)
    statics = dict(sampling=sampling, eos_id=int(eos_id))
    limit = jnp.int32(layout.limit)
    context = lambda: sharding.logical_context(mesh, sharding.generation_rules(rules))  # noqa: E731

    # Prompts start shortest first, so that a batch prefilled together is padded little.
    order = sorted(range(len(prompts)), key=lambda prompt: len(prompts[prompt]))
    waiting = collections.deque((prompt, k) for prompt in order for k in range(samples))
    occupant: list[tuple[int, int] | None] = [None] * slot_count  # the (prompt, sample) each slot decodes
    # Room for the prompts of one full refill (every slot at once) and one more: prefills come in batches.
    capacity = min(generate.bucket(-(-slot_count // samples) + 1, 2), MAX_PREFIXES)
    prefilled = _Prefilled(-(-capacity // shards) * shards, samples, order)
    results: list[Answer | None] = [None] * (len(prompts) * samples)
    with context():
        device_slots, prefixes = _compiled_empty(graphdef, state, slot_count, layout.prompt, layout.new,
                                                 prefilled.capacity)
    while True:
        if waiting and None in occupant:
            with context():
                device_slots, prefixes = _start_waiting(graphdef, state, device_slots, prefixes, prefilled, prompts,
                                                        key_ids, waiting, occupant, layout, seed_key, limit, mesh,
                                                        rules, shards, statics)
        elif any(occupant):
            stop = refill_at if waiting else slot_count
            with context():
                device_slots = _compiled_decode(graphdef, state, device_slots, seed_key, limit, jnp.int32(stop),
                                                **statics)
        else:
            break
        _collect(device_slots, occupant, results, samples, eos_id)
    return results


def _plan(longest: int, max_new_tokens: int, context: int) -> generate._Layout:
    """The static path's prompt and new-token slots, but the prompt rounded up to a multiple of
    PROMPT_STEP rather than a power of two: every slot attends to the whole prompt area at every
    step, so it is kept close to the longest prompt (a few programs still serve many prompt sets)."""
    generate._plan([longest], max_new_tokens, context, 1)  # the same checks and messages
    prompt = max(longest, min(-(-longest // PROMPT_STEP) * PROMPT_STEP, context - max_new_tokens))
    new = min(generate.bucket(max_new_tokens, generate.MIN_NEW_TOKENS_BUCKET), context - prompt)
    return generate._Layout(batch=0, prompt=prompt, new=new, limit=min(max_new_tokens, new))


class _Prefilled:
    """Which prompt each row of `_Prefixes` holds, and how many of its samples have not started."""

    def __init__(self, capacity: int, samples: int, order: list[int]):
        self.capacity, self.samples, self.order = capacity, samples, order
        self.place = {prompt: place for place, prompt in enumerate(order)}  # in the order prompts start
        self.row: dict[int, int] = {}
        self.unstarted: dict[int, int] = {}

    def upcoming(self, prompt: int, count: int) -> list[int]:
        """`prompt` and the prompts after it in the order they start, `count` at most."""
        return self.order[self.place[prompt]:self.place[prompt] + count]

    def free_rows(self, excluded: set[int]) -> list[int]:
        taken = set(self.row.values()) | excluded
        return [row for row in range(self.capacity) if row not in taken]

    def add(self, prompt: int, row: int) -> None:
        self.row[prompt], self.unstarted[prompt] = row, self.samples

    def start(self, prompt: int) -> int:
        """The row of `prompt`'s prefix, for one more of its samples; the row is free once all have started."""
        row = self.row[prompt]
        self.unstarted[prompt] -= 1
        if not self.unstarted[prompt]:
            del self.row[prompt], self.unstarted[prompt]
        return row


def _start_waiting(graphdef, state, device_slots, prefixes, prefilled: _Prefilled, prompts, key_ids, waiting,
                   occupant, layout, seed_key, limit, mesh, rules, shards, statics):
    """Starts the next waiting answers in the free slots. When the next one's prompt is not prefilled,
    the next prompts in line are, as many as there are free prefix rows, in the same program."""
    slot_count = len(occupant)
    started: list[tuple[int, int, int, int, int]] = []  # (slot, prefix row, prompt id, sample, prompt length)
    to_prefill: list[tuple[int, int]] = []  # (prompt, prefix row)
    for slot in [slot for slot, held in enumerate(occupant) if held is None]:
        if not waiting:
            break
        prompt, k = waiting[0]
        if prompt not in prefilled.row:
            # The prefill runs before this program's starts: it must not overwrite a row they read.
            free = prefilled.free_rows({row for _, row, *_ in started})
            if to_prefill or not free:
                break
            to_prefill = list(zip(prefilled.upcoming(prompt, len(free)), free))
            for pair in to_prefill:
                prefilled.add(*pair)
        waiting.popleft()
        started.append((slot, prefilled.start(prompt), key_ids[prompt], k, len(prompts[prompt])))
        occupant[slot] = (prompt, k)
    # Counts and the prompts' length padded to powers of two: a few compiled programs serve every refill.
    tokens = lengths = rows = None
    if to_prefill:
        count = -(-generate.bucket(len(to_prefill), 1) // shards) * shards
        longest = max(len(prompts[prompt]) for prompt, _ in to_prefill)
        width = min(generate.bucket(longest, generate.MIN_PROMPT_BUCKET), layout.prompt)
        tokens = np.full((count, width), PAD_ID, np.int32)
        lengths = np.ones((count,), np.int32)  # padding rows hold one PAD token
        rows = np.full((count,), prefilled.capacity, np.int32)  # padding rows are written nowhere
        for index, (prompt, row) in enumerate(to_prefill):
            tokens[index, width - len(prompts[prompt]):] = prompts[prompt]
            lengths[index], rows[index] = len(prompts[prompt]), row
        tokens, lengths, rows = generate._place(mesh, rules, tokens, lengths, rows)
    entries = np.zeros((generate.bucket(len(started), 1), 5), np.int32)
    entries[:, 0] = slot_count  # padding entries name no slot: their writes are dropped
    entries[:len(started)] = started
    slot_ids, source, prompt_ids, sample_ids, prompt_lengths = entries.T
    return _compiled_insert(graphdef, state, device_slots, prefixes, tokens, lengths, rows, slot_ids, source,
                            prompt_ids, sample_ids, prompt_lengths, seed_key, limit, **statics)


def _collect(device_slots: _Slots, occupant, results, samples: int, eos_id: int) -> None:
    """Moves every ended answer out of its slot into `results`, freeing the slot."""
    done = generate.to_host(device_slots.done)
    ended = [slot for slot, held in enumerate(occupant) if held is not None and done[slot]]
    if not ended:
        return
    steps, tokens, log_probs = (generate.to_host(array) for array in
                                (device_slots.step, device_slots.tokens, device_slots.log_probs))
    for slot in ended:
        prompt, k = occupant[slot]
        answer = tokens[slot, :steps[slot]].tolist()
        results[prompt * samples + k] = Answer(
            prompt=prompt, sample=k, tokens=tuple(answer), finished=bool(answer) and answer[-1] == eos_id,
            log_probs=tuple(log_probs[slot, :steps[slot]].tolist()))
        occupant[slot] = None
