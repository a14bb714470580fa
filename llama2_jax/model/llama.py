"""The Llama 2 decoder in Flax NNX: pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so one block is
compiled whatever the depth; the remat policy wraps that one block. Weights are stored in
`param_dtype` and cast to `compute_dtype` where they are used; norms, softmax and logits are
float32. With low-rank adapters (model/lora.py) the base weights are stored in `base_dtype` and the
adapters in `param_dtype`; a QLoRA base keeps the blocks' projections in 8 or 4 bits (model/quantize.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llama2_jax.model import axes, lora, quantize
from llama2_jax.model.attention import cached_attention, dot_product_attention
from llama2_jax.model.config import REMAT_POLICIES, LlamaConfig
from llama2_jax.model.rope import apply_rope

def _param(rngs: nnx.Rngs, shape, dtype, logical_axes, stddev=0.02) -> nnx.Param:
    init = nnx.initializers.normal(stddev=stddev)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(logical_axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, config: LlamaConfig):
        self.scale = nnx.Param(jnp.ones((dim,), config.base_dtype), logical_axes=(axes.NORM,))
        self.eps = eps
        self.compute_dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dim, heads, kv_heads, head_dim = (
            config.dim, config.n_heads, config.n_kv_heads, config.head_dim,
        )
        dtype = config.base_dtype
        self.wq = _param(rngs, (dim, heads, head_dim), dtype, (axes.EMBED, axes.Q_HEADS, axes.HEAD_DIM))
        self.wk = _param(rngs, (dim, kv_heads, head_dim), dtype, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
        self.wv = _param(rngs, (dim, kv_heads, head_dim), dtype, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
        # Residual-branch outputs start smaller so the stream's variance does not grow with depth.
        self.wo = _param(
            rngs, (heads, head_dim, dim), dtype, (axes.Q_HEADS, axes.HEAD_DIM, axes.EMBED),
            stddev=0.02 / (2 * config.n_layers) ** 0.5,
        )
        quantize.quantize_weights(self, ("wq", "wk", "wv", "wo"), config.quantized_dtype)
        self.config = config

    def __call__(self, x, positions, segment_ids, cache: LayerCache | None = None):
        cfg = self.config
        cast = lambda name: quantize.weight(self, name, cfg.compute_dtype)  # noqa: E731
        q = lora.adapted(self, "wq", x, jnp.einsum("btd,dhk->bthk", x, cast("wq")))
        k = lora.adapted(self, "wk", x, jnp.einsum("btd,dhk->bthk", x, cast("wk")))
        v = lora.adapted(self, "wv", x, jnp.einsum("btd,dhk->bthk", x, cast("wv")))
        q = axes.constrain(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
        k = axes.constrain(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
        v = axes.constrain(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)

        # The scopes name these pieces in profiles (`bench generate` sorts a decoding step's time by them).
        if cache is not None:
            with jax.named_scope("cache_write"):
                cache = cache.write(k, v)
        with jax.named_scope("attention"):
            if cache is None or cache.prefill:
                out = dot_product_attention(q, k, v, segment_ids, segment_ids, implementation=cfg.attention)
            else:
                out = cached_attention(q, cache.keys, cache.values, segment_ids, cache.segment_ids, cache.index)
        return lora.adapted(self, "wo", out, jnp.einsum("bthk,hkd->btd", out, cast("wo"))), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dim, hidden, dtype = config.dim, config.ffn_dim, config.base_dtype
        self.w1 = _param(rngs, (dim, hidden), dtype, (axes.EMBED, axes.MLP))
        self.w3 = _param(rngs, (dim, hidden), dtype, (axes.EMBED, axes.MLP))
        self.w2 = _param(
            rngs, (hidden, dim), dtype, (axes.MLP, axes.EMBED),
            stddev=0.02 / (2 * config.n_layers) ** 0.5,
        )
        quantize.quantize_weights(self, ("w1", "w3", "w2"), config.quantized_dtype)
        self.compute_dtype = config.compute_dtype

    def __call__(self, x):
        cast = lambda name: quantize.weight(self, name, self.compute_dtype)  # noqa: E731
        gate = jax.nn.silu(lora.adapted(self, "w1", x, x @ cast("w1")))
        up = lora.adapted(self, "w3", x, x @ cast("w3"))
        hidden = axes.constrain(gate * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
        return lora.adapted(self, "w2", hidden, hidden @ cast("w2"))


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, config)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, config)
        self.feed_forward = FeedForward(config, rngs=rngs)
        # Drawn after every base weight, so a seed gives the same base with adapters or without.
        lora.add_adapters(self.attention, "attention", config, rngs=rngs)
        lora.add_adapters(self.feed_forward, "feed_forward", config, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache: LayerCache | None = None):
        # Sequence parallelism: the stream and its norms stay split by length; each branch gathers
        # its normed input whole, and its output projection's partial sums are reduce-scattered
        # back onto the split stream.
        attended, cache = self.attention(_whole_length(self.attention_norm(x)), positions, segment_ids, cache)
        h = residual_stream(x + attended)
        out = h + self.feed_forward(_whole_length(self.ffn_norm(h)))
        return residual_stream(out), cache


def residual_stream(x: jax.Array) -> jax.Array:
    """The stream between blocks, which is what remat keeps of each block: split by length over
    the devices `residual_length` maps to (tensor, by default), whole model dimension."""
    return axes.constrain(x, (axes.BATCH, axes.RESIDUAL_LENGTH, axes.ACT_EMBED))


def _whole_length(x: jax.Array) -> jax.Array:
    return axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


@struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding, kv heads only.

    `keys`/`values`: one array per layer, [batch, kv_heads, max_length, head_dim]: each layer's
    cache is a buffer of its own, written in place, and heads come before slots so attention reads
    each head's keys as one contiguous block. (One stacked buffer indexed by a scanned layer, or
    slots before heads, costs a copy of the layer's cache per decoded token.) `segment_ids`:
    [batch, max_length], 0 for padding and for slots not yet written; `index`: the next slot, a
    scalar shared by every row, or [batch], each row's own (continuous batching, where a row's
    answer starts whenever its previous one ended).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def layer(self, layer: int, prefill: bool = False) -> "LayerCache":
        return LayerCache(self.keys[layer], self.values[layer], self.segment_ids, self.index, prefill)

    def repeat(self, times: int) -> "KVCache":
        """Each row repeated `times` times in place (row i becomes rows i * times … i * times + times - 1):
        the cache of one prompt shared by several samples of it."""
        rows = lambda a: jnp.repeat(a, times, axis=0)  # noqa: E731
        return self.replace(keys=tuple(map(rows, self.keys)), values=tuple(map(rows, self.values)),
                            segment_ids=rows(self.segment_ids))


@struct.dataclass
class LayerCache:
    """One layer's keys and values, with the slots' segment ids and the next slot to write;
    `prefill`: the tokens are a prompt written into an empty cache, attending to themselves alone."""

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    prefill: bool = struct.field(pytree_node=False, default=False)

    def write(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        """Stores new keys and values [batch, T, kv_heads, head_dim] at slots [index, index + T)
        (each row at its own index when `index` is per row)."""
        heads_major = lambda a, cached: jnp.swapaxes(a, 1, 2).astype(cached.dtype)  # noqa: E731
        k, v = heads_major(k, self.keys), heads_major(v, self.values)
        if self.index.ndim == 0:
            slot = (0, 0, self.index, 0)
            return self.replace(keys=jax.lax.dynamic_update_slice(self.keys, k, slot),
                                values=jax.lax.dynamic_update_slice(self.values, v, slot))
        # One update per row, each at its own slot (a scatter XLA still does in place).
        rows = jax.vmap(lambda buffer, new, index: jax.lax.dynamic_update_slice(buffer, new, (0, index, 0)))
        return self.replace(keys=rows(self.keys, k, self.index), values=rows(self.values, v, self.index))


class Transformer(nnx.Module):
    """Embedding, the stacked blocks and the final norm: what the LM and the reward model share."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = nnx.Module()
        self.embedder.embedding = _param(
            rngs, (config.vocab_size, config.dim), config.base_dtype, (axes.VOCAB, axes.EMBED)
        )

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(
            in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: axes.LAYERS, "logical_axes": axes.LAYERS},
        )
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.norm = RMSNorm(config.dim, config.norm_eps, config)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [batch, length, dim] in the compute dtype."""
        positions = _default_positions(tokens, positions)
        x = self._embed(tokens)
        return self.norm(self._run_layers(x, positions, segment_ids))

    def _embed(self, tokens):
        # A row gather cannot be split over a sharded table without the partitioner replicating
        # it in float32; gather the table once in the compute dtype, as FSDP gathers any weight.
        table = self.embedder.embedding[...].astype(self.config.compute_dtype)
        x = jnp.take(axes.constrain(table, (None, None)), tokens, axis=0)
        return residual_stream(x)

    def _run_layers(self, x, positions, segment_ids):
        """Scans the stacked blocks: one compiled block whatever the depth."""
        graphdef, layer_state = nnx.split(self.layers)
        # Adapter dropout in a training step: each layer its own key, scanned with its weights.
        key = lora.dropout_key()
        layer_keys = None if key is None else jax.random.split(key, self.config.n_layers)

        def one_block(h, layer):
            state, layer_key = layer
            with lora.dropout_keys(layer_key):
                h, _ = nnx.merge(graphdef, state)(h, positions, segment_ids)
            return h, None

        policy = REMAT_POLICIES[self.config.remat]
        if policy is not None:
            one_block = jax.checkpoint(
                one_block, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False
            )
        x, _ = jax.lax.scan(one_block, x, (layer_state, layer_keys))
        return x

    def _decode_layers(self, x, positions, segment_ids, cache: KVCache, prefill: bool) -> tuple[jax.Array, KVCache]:
        """Runs the blocks one after another, each against its own cache buffer.

        Decoding unrolls the layers rather than scanning them: a scan reads each layer's weights
        and cache through a dynamic index, which copies them on every decoded token. Blocks come
        from `unstack_layers` (once, before sampling) or are sliced here from the stacked weights.
        """
        blocks = self.layers if isinstance(self.layers, nnx.List) else unstacked_blocks(self.layers)
        keys, values = [], []
        for layer, block in enumerate(blocks):
            x, layer_cache = block(x, positions, segment_ids, cache.layer(layer, prefill))
            keys.append(layer_cache.keys)
            values.append(layer_cache.values)
        return x, cache.replace(keys=tuple(keys), values=tuple(values))


def unstacked_blocks(layers: Block) -> list[Block]:
    """The blocks of a stacked `layers` module, each with its own weights and logical axes."""
    graphdef, state = nnx.split(layers)

    def layer_of(index):
        def take(variable):
            names = variable.get_metadata().get("logical_axes")
            return variable.replace(variable[...][index], logical_axes=names and names[1:])

        return nnx.merge(graphdef, jax.tree.map(take, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))

    return [layer_of(index) for index in range(jax.tree.leaves(state)[0].shape[0])]


def unstack_layers(model: Transformer) -> Transformer:
    """A model sharing `model`'s weights whose layers are a list of blocks (`nnx.List`): the form
    decoding runs fastest in. Only `decode` accepts it; training and scoring scan stacked layers."""
    graphdef, state = nnx.split(model)
    unstacked = nnx.merge(graphdef, state)
    unstacked.layers = nnx.List(unstacked_blocks(unstacked.layers))
    return unstacked


class Llama(Transformer):
    """The causal language model: `model(tokens, positions, segment_ids)` → float32 logits."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.output = nnx.Module()
        self.output.kernel = _param(
            rngs, (config.dim, config.vocab_size), config.base_dtype, (axes.EMBED, axes.VOCAB)
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [batch, length, vocab] in float32.

        `positions` default to 0..length-1; `segment_ids` (1, 2, … per packed document, 0 for
        padding) keep documents from attending to each other; None means one document per row.
        """
        return self.logits(self.hidden_states(tokens, positions, segment_ids))

    def logits(self, hidden: jax.Array) -> jax.Array:
        kernel = self.output.kernel[...].astype(self.config.compute_dtype)
        logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return axes.constrain(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))

    def init_cache(self, batch_size: int, max_length: int, dtype=None, per_row_index: bool = False) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_length` tokens (prompt included); with
        `per_row_index`, each row keeps its own next slot."""
        cfg = self.config
        if max_length > cfg.max_seq_len:
            raise ValueError(
                f"cache of {max_length} tokens exceeds the model's context of {cfg.max_seq_len}; "
                "shorten the prompt or the number of new tokens"
            )
        shape = (batch_size, cfg.n_kv_heads, max_length, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
            index=jnp.zeros((batch_size,) if per_row_index else (), jnp.int32),
        )

    def prefill(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """Runs prompts `tokens` [batch, T] into an empty cache (slots [0, T)); the last token's logits.

        The prompt attends to itself alone, with the configured attention kernel (cuDNN, splash),
        rather than to the whole cache, most of which is still empty. Rows of different lengths are
        left-padded, so the last slot is every row's last token: only its logits [batch, vocab] are
        computed (each other position would cost a vocabulary-wide matmul). Padding has segment id 0
        and is never attended by real tokens.
        """
        return self._run_cached(tokens, positions, segment_ids, cache, prefill=True)

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """Runs `tokens` [batch, T] (one new token per row, usually) at cache slots [index, index + T),
        attending to everything cached so far; the logits of the last token [batch, vocab]."""
        return self._run_cached(tokens, positions, segment_ids, cache, prefill=False)

    def _run_cached(self, tokens, positions, segment_ids, cache: KVCache, prefill: bool):
        length = tokens.shape[1]
        cache = cache.replace(segment_ids=_write_slots(cache.segment_ids, segment_ids, cache.index))
        x, cache = self._decode_layers(self._embed(tokens), positions, segment_ids, cache, prefill)
        last = self.norm(x[:, -1:])
        return self.logits(last)[:, 0], cache.replace(index=cache.index + length)


def _write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [batch, T] written into `buffer` [batch, length] at slots [index, index + T), with one
    index for every row or one per row."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, index))
    return jax.vmap(lambda row, values, start: jax.lax.dynamic_update_slice(row, values, (start,)))(buffer, new, index)


class LlamaRewardModel(Transformer):
    """The reward model: the backbone with a scalar head in place of the next-token head.

    The head starts as N(0, 1/(dim + 1)), as in Stiennon et al. 2020 (and close to the 0.02 that
    transformers gives a 7B-wide LlamaForSequenceClassification): the final norm's output has unit
    scale per feature, so initial scores are of order 1 at any width, and the backbone gets a
    gradient of useful size from the first step (a zero head would give it none until the head grew).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.score = nnx.Module()
        self.score.kernel = _param(rngs, (config.dim, 1), config.param_dtype, (axes.EMBED, None),
                                   stddev=(config.dim + 1) ** -0.5)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """One float32 score per row: the last non-padding token's hidden state, projected.

        Padding is wherever `segment_ids` is 0 (left or right); without segment ids the whole
        row is the sequence.
        """
        hidden = self.hidden_states(tokens, positions, segment_ids)
        length = tokens.shape[1]
        if segment_ids is None:
            last = jnp.full((tokens.shape[0],), length - 1)
        else:
            last = length - 1 - jnp.argmax(segment_ids[:, ::-1] != 0, axis=1)
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        kernel = self.score.kernel[...].astype(jnp.float32)
        return (final.astype(jnp.float32) @ kernel)[:, 0]

    def token_scores(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The score head at every position, float32 [batch, length]: what PPO's value model reads
        (the value of the text so far). The last real token's entry is `__call__`'s score."""
        hidden = self.hidden_states(tokens, positions, segment_ids)
        kernel = self.score.kernel[...].astype(jnp.float32)
        return (hidden.astype(jnp.float32) @ kernel)[..., 0]


class ActorCritic(nnx.Module):
    """PPO's two trained models as one: the policy (a `Llama`) and the value model (a reward model
    read at every token). Both have the config's shape; their parameters are the `policy` and `value`
    subtrees, which the optimizer steps with learning rates of their own."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None, policy: Llama | None = None,
                 value: LlamaRewardModel | None = None):
        self.config = config
        self.policy = policy if policy is not None else Llama(config, rngs=rngs)
        self.value = value if value is not None else LlamaRewardModel(config, rngs=rngs)


# The model classes a checkpoint can hold, by the name written into it.
MODEL_KINDS: dict[str, type[Transformer]] = {"llama": Llama, "reward": LlamaRewardModel}
# The models a stage trains: the checkpoint kinds, and PPO's policy and value model as one.
TRAINED_KINDS: dict[str, type[nnx.Module]] = {**MODEL_KINDS, "actor_critic": ActorCritic}


def model_kind(model_class: type) -> str:
    """The name under which `model_class` is saved (see MODEL_KINDS)."""
    for kind, known in MODEL_KINDS.items():
        if model_class is known:
            return kind
    raise ValueError(f"{model_class.__name__} is not a saved model kind; known: {sorted(MODEL_KINDS)}")


def _default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def param_count(config: LlamaConfig) -> int:
    """Number of parameters of the language model, counted on shapes alone (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
