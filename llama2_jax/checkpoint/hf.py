"""Hugging Face Llama checkpoints: `config.json` plus safetensors, single file or sharded with an index.

HF's q/k rows are already in the rotate-half RoPE layout our model uses, so importing is renaming
and transposing. Older repositories ship `pytorch_model.bin` files instead; they are torch zip
archives and are read the same way as Meta's `.pth` files.

A language model is a `LlamaForCausalLM` (`lm_head.weight`); a reward model is the layout HF reward
models use, a `LlamaForSequenceClassification` with one label (`score.weight` [1, dim], and
`pad_token_id` 0, our padding id, by which HF finds each row's last token). `config.json`'s dtype is
the dtype HF runs the model in, so it records our compute dtype; a file without one computes in the
dtype its weights are stored in.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from llama2_jax.checkpoint import layout
from llama2_jax.checkpoint.lazy import LazyArray, as_lazy
from llama2_jax.checkpoint.safetensors import read_safetensors, write_safetensors
from llama2_jax.checkpoint.torch_pickle import read_pth
from llama2_jax.model.config import LlamaConfig

CONFIG_FILE = "config.json"
WEIGHT_FILES = (  # (single file, index) pairs in order of preference
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
GLOBAL_NAMES = {
    "embedder.embedding": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "output.kernel": "lm_head.weight",
    "score.kernel": "score.weight",
}
# What config.json says beyond the shape, by model kind. The reward model's twin scores with one
# label, at each row's last token that is not padding, which HF finds by our padding id, 0.
KIND_FIELDS = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "reward": {
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": 1,
        "pad_token_id": 0,
    },
}
ARCHITECTURES = {kind: fields["architectures"][0] for kind, fields in KIND_FIELDS.items()}
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj.weight",
    "attention.wk": "self_attn.k_proj.weight",
    "attention.wv": "self_attn.v_proj.weight",
    "attention.wo": "self_attn.o_proj.weight",
    "feed_forward.w1": "mlp.gate_proj.weight",
    "feed_forward.w3": "mlp.up_proj.weight",
    "feed_forward.w2": "mlp.down_proj.weight",
    "attention_norm.scale": "input_layernorm.weight",
    "ffn_norm.scale": "post_attention_layernorm.weight",
}
# Buffers some exporters save that carry no weights (RoPE frequencies are recomputed).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def hf_name(key: str) -> str:
    """Our per-layer key (`layers.3.attention.wq`) -> HF tensor name."""
    if key in GLOBAL_NAMES:
        return GLOBAL_NAMES[key]
    _, layer, name = key.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[name]}"


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and not os.path.isfile(
        os.path.join(path, "model_config.json")
    )


def _read_config_json(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, CONFIG_FILE)) as file:
        return json.load(file)


def read_hf_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
    """`config.json` as a LlamaConfig, refusing models that are not Llama 2 shaped."""
    hf_config = _read_config_json(path)
    # transformers >= 5 nests RoPE settings under "rope_parameters"; older files keep rope_theta flat.
    rope = hf_config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        hf_config.setdefault("rope_theta", rope["rope_theta"])
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters {rope} are not supported (Llama 2 uses plain RoPE)")
    if hf_config.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {hf_config['model_type']!r}, not 'llama'")
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf_config['hidden_act']!r}, not 'silu'")
    if hf_config.get("rope_scaling"):
        problems.append(
            f"rope_scaling {hf_config['rope_scaling']} is not supported (Llama 2 has none)"
        )
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        problems.append("attention or MLP biases are not supported (Llama 2 has none)")
    head_dim = hf_config.get("head_dim")
    if head_dim and head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        problems.append(f"head_dim {head_dim} x heads != hidden_size {hf_config['hidden_size']}")
    if problems:
        raise ValueError(f"{path}/{CONFIG_FILE} is not a Llama 2 model: " + "; ".join(problems))
    return LlamaConfig.from_hf_config(hf_config, **overrides)


def _model_kind(path: str, hf_config: dict, tensor_names: set[str]) -> str:
    """`llama` or `reward`: the head the weights hold, which must be the one `architectures` names."""
    heads = {kind: GLOBAL_NAMES[head] for kind, head in layout.HEADS.items()}
    found = [kind for kind, name in heads.items() if name in tensor_names]
    if not found and hf_config.get("tie_word_embeddings"):
        found = ["llama"]  # the next-token head is the embedding itself
    architectures = hf_config.get("architectures") or [ARCHITECTURES[kind] for kind in found]
    named = [kind for kind, name in ARCHITECTURES.items() if name in architectures]
    if len(architectures) != 1 or len(named) != 1:
        raise ValueError(
            f"{path}/{CONFIG_FILE}: architectures {architectures} are not supported; "
            f"expected one of {sorted(ARCHITECTURES.values())}"
        )
    kind = named[0]
    if found != [kind]:
        raise ValueError(
            f"{path}: a {ARCHITECTURES[kind]} needs the head tensor {heads[kind]}, but the "
            f"checkpoint holds {[heads[k] for k in found] or 'no head'}"
        )
    labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 1)
    if kind == "reward" and labels != 1:
        raise ValueError(
            f"{path}/{CONFIG_FILE}: a LlamaForSequenceClassification with {labels} labels; only a "
            "single-score reward model (num_labels 1) can be read"
        )
    return kind


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> the file that holds it, checking every shard named by an index exists."""
    for single, index in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as file:
                weight_map = json.load(file)["weight_map"]
            missing = sorted(
                {f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))}
            )
            if missing:
                raise FileNotFoundError(
                    f"{path}/{index} lists shard files that are missing: {missing}"
                )
            return {name: os.path.join(path, f) for name, f in weight_map.items()}
        if os.path.isfile(os.path.join(path, single)):
            return {None: os.path.join(path, single)}
    expected = ", ".join(name for pair in WEIGHT_FILES for name in pair)
    raise FileNotFoundError(f"no Hugging Face weights in {path}: expected one of {expected}")


def _read_tensors(path: str) -> dict[str, LazyArray]:
    tensors = {}
    for weight_file in sorted(set(_weight_files(path).values())):
        reader = read_safetensors if weight_file.endswith(".safetensors") else read_pth
        tensors.update(reader(weight_file))
    return tensors


def read_hf(
    path: str | os.PathLike, **config_overrides
) -> tuple[LlamaConfig, dict[str, LazyArray]]:
    """Config and every tensor in our per-layer layout (lazy: nothing is read until loaded)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; not a Hugging Face checkpoint")
    hf_config = _read_config_json(path)
    source = {
        name: t for name, t in _read_tensors(path).items() if not name.endswith(IGNORED_SUFFIXES)
    }
    storage_dtype = _storage_dtype(path, source)
    kind = _model_kind(path, hf_config, set(source))
    if kind == "llama" and hf_config.get("tie_word_embeddings"):
        source.setdefault("lm_head.weight", source["model.embed_tokens.weight"])
    stored = {"param_dtype": storage_dtype}
    if not (hf_config.get("dtype") or hf_config.get("torch_dtype")):
        stored["compute_dtype"] = storage_dtype
    config = read_hf_config(path, **{**stored, **config_overrides})
    tensors = {}
    for key in layout.per_layer_keys(config, kind):
        name = hf_name(key)
        if name not in source:
            raise ValueError(f"{path}: tensor {name} is missing from the checkpoint")
        weight = source.pop(name)
        layout.check_shape(config, key, name, weight.shape)
        tensors[key] = layout.from_torch(config, key, weight)
    if source:
        raise ValueError(
            f"{path}: tensors {sorted(source)[:5]} do not belong to a {config.n_layers}-layer Llama"
        )
    return config, tensors


def _storage_dtype(path: str, tensors: Mapping[str, LazyArray]) -> str:
    """The dtype the weights are stored in (the embedding's: exporters write one dtype)."""
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is None:
        raise ValueError(f"{path}: tensor model.embed_tokens.weight is missing from the checkpoint")
    return np.dtype(embedding.dtype).name


def _group_into_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current] if current else shards


def write_hf(
    path: str | os.PathLike,
    config: LlamaConfig,
    tensors: Mapping[str, LazyArray],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `config.json` and safetensors (sharded with an index past `max_shard_bytes`)."""
    path = os.fspath(path)
    kind = layout.kind_of(tensors)
    os.makedirs(path, exist_ok=True)
    hf_tensors = {
        hf_name(key): layout.to_torch(config, key, as_lazy(tensors[key]))
        for key in layout.per_layer_keys(config, kind)
    }
    hf_config = {**config.to_hf_config(), **KIND_FIELDS[kind]}
    with open(os.path.join(path, CONFIG_FILE), "w") as file:
        json.dump(hf_config, file, indent=2)
    shards = _group_into_shards({name: t.nbytes for name, t in hf_tensors.items()}, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), hf_tensors, {"format": "pt"})
        return
    weight_map = {}
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(
            os.path.join(path, file_name), {n: hf_tensors[n] for n in names}, {"format": "pt"}
        )
        weight_map.update({name: file_name for name in names})
    total_size = sum(t.nbytes for t in hf_tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as file:
        json.dump(
            {"metadata": {"total_size": total_size}, "weight_map": weight_map}, file, indent=2
        )
