"""Generate the converter parity fixtures in tests/fixtures/ with the reference implementations.

Needs torch and transformers (the package and its tests do not). For each tiny config (multi-head and
grouped-query) it builds a Hugging Face `LlamaForCausalLM` with random float32 weights and writes:

  hf/           save_pretrained, one model.safetensors
  hf_sharded/   save_pretrained with a small max_shard_size: several files + model.safetensors.index.json
  meta/         params.json + consolidated.00.pth (torch.save), q/k rows in Meta's adjacent-pair layout
  meta_2shard/  the same weights split over two model-parallel ranks as Meta splits them (docs/recipe.md)
  tokens.npy    [batch, length] int32 token ids
  logits.npy    [batch, length, vocab] float32 logits of LlamaForCausalLM on those tokens

and a reward model, `reward/`: a grouped-query `LlamaForSequenceClassification` with one label, the
layout Hugging Face reward models use, and:

  hf/           save_pretrained (score.weight [1, dim], pad_token_id 0)
  tokens.npy    [batch, length] int32 token ids, 0 (padding) on the right of some rows and on the
                left of others
  scores.npy    [batch] float32 scores of LlamaForSequenceClassification on those tokens, with the
                attention mask `tokens != 0` and positions 0..length-1 across any padding (the
                default of transformers and of our LlamaRewardModel alike)

The Meta files are checked here against an independent re-implementation of Meta's reference forward
pass (complex-number RoPE over adjacent pairs), so the fixtures pin down the RoPE layout conversion
rather than merely agreeing with our own converter.

    python scripts/make_parity_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
}
SHAPE = dict(vocab_size=128, dim=32, n_layers=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)
BATCH, LENGTH = 2, 12
PAD_ID = 0
# Real tokens per reward row and where its padding goes: both of HF's cases and a full row.
REWARD_ROWS = ((12, "none"), (7, "right"), (5, "left"), (9, "left"), (3, "right"))


def ffn_dim(dim: int, multiple_of: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_model(
    params: dict, seed: int, model_class=transformers.LlamaForCausalLM, **config_fields
) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["dim"],
        intermediate_size=ffn_dim(params["dim"], params["multiple_of"]),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params["n_kv_heads"],
        rms_norm_eps=params["norm_eps"],
        rope_theta=params["rope_theta"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **config_fields,
    )
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():  # weights large enough that any layout mistake moves the logits visibly
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.25 * torch.randn_like(parameter))
    return model


def hf_to_meta_state(state: dict, params: dict) -> dict:
    """The inverse of HF's convert_llama_weights_to_hf.py: names, and q/k rows back to adjacent pairs."""
    head_dim = params["dim"] // params["n_heads"]

    def unpermute(weight, heads):
        return (
            weight.view(heads, 2, head_dim // 2, params["dim"])
            .transpose(1, 2)
            .reshape(-1, params["dim"])
        )

    meta = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for i in range(params["n_layers"]):
        hf = f"model.layers.{i}."
        meta |= {
            f"layers.{i}.attention.wq.weight": unpermute(
                state[hf + "self_attn.q_proj.weight"], params["n_heads"]
            ),
            f"layers.{i}.attention.wk.weight": unpermute(
                state[hf + "self_attn.k_proj.weight"], params["n_kv_heads"]
            ),
            f"layers.{i}.attention.wv.weight": state[hf + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": state[hf + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": state[hf + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": state[hf + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": state[hf + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": state[hf + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": state[hf + "post_attention_layernorm.weight"],
        }
    return {name: tensor.clone().contiguous() for name, tensor in meta.items()}


def split_meta_state(meta: dict, shards: int) -> list[dict]:
    """Model-parallel split: column-parallel weights on dim 0, row-parallel (and embeddings) on dim 1."""

    def axis(name):
        if "norm" in name:
            return None
        return 1 if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0

    return [
        {
            name: (t if axis(name) is None else t.chunk(shards, dim=axis(name))[rank]).clone()
            for name, t in meta.items()
        }
        for rank in range(shards)
    ]


def meta_reference_logits(meta: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py forward (no cache), written out: RoPE on adjacent pairs as complex numbers."""
    dim, heads, kv_heads = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim, eps = dim // heads, params["norm_eps"]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    length = tokens.shape[1]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis = torch.polar(
        torch.ones(length, head_dim // 2), torch.outer(torch.arange(length).float(), freqs)
    )

    def rope(x):
        x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)

    h = meta["tok_embeddings.weight"][tokens]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        w = {
            name.split(f"layers.{i}.", 1)[1]: t
            for name, t in meta.items()
            if name.startswith(f"layers.{i}.")
        }
        x = rms_norm(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).view(*x.shape[:2], heads, head_dim))
        k = rope((x @ w["attention.wk.weight"].T).view(*x.shape[:2], kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(*x.shape[:2], kv_heads, head_dim)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5 + mask
        attention = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(
            *x.shape[:2], dim
        )
        h = h + attention @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ w["feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w["feed_forward.w3.weight"].T)) @ w["feed_forward.w2.weight"].T
    return rms_norm(h, meta["norm.weight"]) @ meta["output.weight"].T


def write_fixture(out: str, name: str, overrides: dict, seed: int) -> None:
    params = {**SHAPE, **overrides}
    directory = os.path.join(out, name)
    shutil.rmtree(directory, ignore_errors=True)
    model = hf_model(params, seed)
    model.save_pretrained(os.path.join(directory, "hf"))
    model.save_pretrained(os.path.join(directory, "hf_sharded"), max_shard_size="60KB")

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, params["vocab_size"], (BATCH, LENGTH), generator=generator)
    with torch.no_grad():
        logits = model(tokens).logits.float()
        meta = hf_to_meta_state(model.state_dict(), params)
        meta_logits = meta_reference_logits(meta, params, tokens)
    error = (meta_logits - logits).abs().max().item()
    assert error < 1e-4, f"Meta reference forward disagrees with transformers by {error}"

    meta_params = {
        k: params[k]
        for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "norm_eps")
    }
    meta_params["vocab_size"] = -1  # as in Meta's released params.json: read it off the embedding
    for folder, shards in (("meta", 1), ("meta_2shard", 2)):
        os.makedirs(os.path.join(directory, folder))
        with open(os.path.join(directory, folder, "params.json"), "w") as file:
            json.dump(meta_params, file)
        for rank, state in enumerate(split_meta_state(meta, shards)):
            torch.save(state, os.path.join(directory, folder, f"consolidated.{rank:02d}.pth"))
    np.save(os.path.join(directory, "tokens.npy"), tokens.numpy().astype(np.int32))
    np.save(os.path.join(directory, "logits.npy"), logits.numpy().astype(np.float32))
    print(f"{name}: Meta reference vs transformers max |diff| {error:.2e}")


def reward_tokens(vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """REWARD_ROWS as token ids: real tokens drawn from 1..vocab-1, so only padding is PAD_ID."""
    rows = []
    for real, padding in REWARD_ROWS:
        tokens = torch.randint(1, vocab_size, (real,), generator=generator)
        pad = torch.full((LENGTH - real,), PAD_ID)
        rows.append(torch.cat([pad, tokens] if padding == "left" else [tokens, pad]))
    return torch.stack(rows)


def write_reward_fixture(out: str, seed: int) -> None:
    params = {**SHAPE, **CONFIGS["gqa"]}
    directory = os.path.join(out, "reward")
    shutil.rmtree(directory, ignore_errors=True)
    model = hf_model(
        params, seed, transformers.LlamaForSequenceClassification, num_labels=1, pad_token_id=PAD_ID
    )
    model.save_pretrained(os.path.join(directory, "hf"))
    tokens = reward_tokens(params["vocab_size"], torch.Generator().manual_seed(seed))
    with torch.no_grad():
        scores = model(tokens, attention_mask=(tokens != PAD_ID).long()).logits[:, 0].float()
    np.save(os.path.join(directory, "tokens.npy"), tokens.numpy().astype(np.int32))
    np.save(os.path.join(directory, "scores.npy"), scores.numpy().astype(np.float32))
    print(f"reward: scores {np.round(scores.numpy(), 3).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    )
    args = parser.parse_args()
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        write_fixture(args.out, name, overrides, seed)
    write_reward_fixture(args.out, seed=len(CONFIGS))


if __name__ == "__main__":
    main()
