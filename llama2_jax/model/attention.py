"""Attention kernels behind one signature, chosen by `LlamaConfig.attention`.

All take queries [batch, q_len, heads, head_dim] and keys/values [batch, kv_len, kv_heads,
head_dim] (grouped-query attention: each kv head serves heads // kv_heads query heads) and attend
causally by slot. Segment ids keep packed documents apart — a query sees only keys of its own
segment — and id 0 marks padding or an empty cache slot. Decoding against a KV cache takes
`cached_attention`: queries at slots `q_offset + t`, the cache in its own heads-major layout.
"""

import jax
import jax.numpy as jnp
from flax.core import spmd

from llama2_jax.model import axes

# Large enough to vanish under softmax in float32, small enough never to overflow to -inf - -inf.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

PLATFORM_OF_IMPLEMENTATION = {"xla": None, "cudnn": "gpu", "splash": "tpu"}


def check_available(implementation: str, platform: str) -> None:
    """Fails early, and clearly, when a kernel is asked for on a platform that lacks it."""
    needed = PLATFORM_OF_IMPLEMENTATION[implementation]
    if needed is not None and platform != needed:
        raise ValueError(
            f"attention={implementation!r} runs only on {needed.upper()}, but the devices are "
            f"{platform!r}; set model.attention='xla' (works everywhere) or run on a {needed}."
        )


def attention_mask(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_len: int,
    kv_len: int,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Boolean [batch or 1, q_len, kv_len]: causal by slot, and within one segment.

    `q_offset` is the slot of the first query: one for every row, or [batch], each row's own (rows
    of a continuous batch stand at different slots of their caches)."""
    q_slots = jnp.asarray(q_offset)[..., None] + jnp.arange(q_len)  # [q_len] or [batch, q_len]
    mask = jnp.arange(kv_len) <= q_slots[..., None]
    if mask.ndim == 2:
        mask = mask[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """Reference implementation: plain einsums, float32 scores and softmax."""
    mask = attention_mask(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1])
    return _grouped_attention(q, k, v, mask, kv_layout="bskd")


def cached_attention(q, keys, values, q_segment_ids, kv_segment_ids, q_offset):
    """Attention of queries [batch, q_len, heads, head_dim] at slots `q_offset`… (one offset, or one
    per row) against a KV cache laid out heads-major, [batch, kv_heads, cache_len, head_dim] (see `KVCache`).

    The reference einsums in the cache's own layout, so neither operand needs a transposing copy:
    decoding a token is then bound by reading the cache once.
    """
    mask = attention_mask(q_segment_ids, kv_segment_ids, q.shape[1], keys.shape[2], q_offset)
    return _grouped_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, kv_layout="bksd")


def _grouped_attention(q, k, v, mask, *, kv_layout: str):
    """Grouped-query attention with float32 scores and softmax; `kv_layout` names the keys' and
    values' dimensions (b batch, s slot, k kv head, d head dim)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[kv_layout.index("k")]
    grouped_q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", grouped_q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (head_dim**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """cuDNN flash attention; packed documents reach it as a boolean segment mask."""
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Pallas splash attention on TPU, run per device shard inside `shard_map`.

    The kernel sees whole sequences and whole heads of its shard, so the batch may be sharded
    over (data, fsdp) and the heads over tensor, but never the sequence. `interpret` runs the
    same kernel in the Pallas interpreter, on any platform (tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)

    def local_attention(q, k, v, segment_ids):
        _, length, heads, head_dim = q.shape
        block = min(512, length)
        block_sizes = splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block,
            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
            block_q_dq=block, block_kv_dq=block,
        )
        causal = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
        kernel = splash.make_splash_mha(
            causal, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        # The kernel wants [heads, length, head_dim] per example and does not scale the scores.
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q * head_dim**-0.5, k, v))
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        return jnp.swapaxes(jax.vmap(kernel)(q, k, v, ids), 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return local_attention(q, k, v, segment_ids)
    q_spec = axes.logical_to_spec((axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None), rules)
    kv_spec = axes.logical_to_spec((axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None), rules)
    ids_spec = axes.logical_to_spec((axes.BATCH, axes.LENGTH), rules)
    sharded = jax.shard_map(
        local_attention,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return sharded(q, k, v, segment_ids)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    implementation: str,
) -> jax.Array:
    """Dispatches to the configured kernel (decoding against a KV cache is `cached_attention`)."""
    if implementation == "xla":
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if implementation == "splash":
        # The kernel's blocks are whole multiples of the TPU's 128 lanes; a shorter prompt
        # (generation's prefill) is cheap enough for the reference path.
        if q.shape[1] % 128:
            return xla_attention(q, k, v, q_segment_ids, kv_segment_ids)
        return splash_attention(q, k, v, q_segment_ids)
    raise ValueError(f"unknown attention implementation {implementation!r}")
