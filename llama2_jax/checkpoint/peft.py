"""Low-rank adapters in and out in peft's layout for a Llama language model.

    adapter_config.json        peft's LoraConfig: peft_type LORA, r, lora_alpha, target_modules
    adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in]
                               and ...lora_B.weight [out, r], for every layer and target

`peft.PeftModel.from_pretrained(base, DIR)` puts them on the Hugging Face base. They are our adapters
(model/lora.py) in torch's layout: a Hugging Face weight is ours flattened to [in, out] and
transposed (its q and k rows in the same rotate-half order), so A [in axes..., r] becomes lora_A
[r, in] and B [r, out axes...] becomes lora_B [out, r], and W + (alpha / r)·A·B is peft's
W + (lora_alpha / r)·lora_B·lora_A. Reading a directory back needs its base: the adapters are
merged into the base's tensors one at a time (`merged_tensors`), so any conversion target gets the
adapted model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from llama2_jax import storage
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.checkpoint.safetensors import read_safetensors, write_safetensors
from llama2_jax.model import lora
from llama2_jax.model.config import LlamaConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
# peft's module name of each target (`self_attn.q_proj`), and back from its last part (`q_proj`).
PEFT_NAMES = {target: peft_name for target, (_, _, _, peft_name) in lora.TARGETS.items()}
TARGETS_OF_MODULE = {peft_name.rsplit(".", 1)[1]: target for target, peft_name in PEFT_NAMES.items()}


def is_peft_directory(path: str | os.PathLike) -> bool:
    return (storage.as_path(path) / CONFIG_FILE).is_file()


def write_peft(path: str | os.PathLike, config: LlamaConfig, adapters: Mapping[str, np.ndarray],
               base: str = "") -> None:
    """Adapters (our stacked arrays by dotted name, `layers.attention.wq_lora.lora_a`) of a model
    of `config` as a peft directory; `base` is recorded as `base_model_name_or_path`."""
    directory = storage.as_path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target in config.lora_targets:
        owner, weight, _, peft_name = lora.TARGETS[target]
        a = np.asarray(adapters[f"layers.{owner}.{lora.adapter_name(weight)}.{lora.A_NAME}"])
        b = np.asarray(adapters[f"layers.{owner}.{lora.adapter_name(weight)}.{lora.B_NAME}"])
        for layer in range(config.n_layers):
            name = f"{PREFIX}.{layer}.{peft_name}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, config.lora_rank).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(config.lora_rank, -1).T)
    write_safetensors(os.fspath(directory / WEIGHTS_FILE), tensors, {"format": "pt"})
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank, "lora_alpha": config.lora_alpha,
        "target_modules": sorted(PEFT_NAMES[target].rsplit(".", 1)[1] for target in config.lora_targets),
        "lora_dropout": config.lora_dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base or None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(settings, indent=2))


def read_settings(path: str | os.PathLike) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, our target names) of a peft directory; one error for what this cannot read."""
    settings = json.loads((storage.as_path(path) / CONFIG_FILE).read_text())
    problems = []
    if settings.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {settings['peft_type']!r} (only LORA is read)")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if settings.get(flag):
            problems.append(f"{flag} true")
    if settings.get("bias", "none") != "none":
        problems.append(f"bias {settings['bias']!r}")
    if settings.get("modules_to_save"):
        problems.append(f"modules_to_save {settings['modules_to_save']}")
    modules = settings.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [module for module in modules if module.rsplit(".", 1)[-1] not in TARGETS_OF_MODULE]
    if unknown:
        problems.append(f"target_modules {unknown} (Llama's are {sorted(TARGETS_OF_MODULE)})")
    if problems:
        raise ValueError(f"{path}/{CONFIG_FILE}: adapters this package cannot read: " + "; ".join(problems))
    targets = tuple(target for target in lora.TARGETS
                    if PEFT_NAMES[target].rsplit(".", 1)[1] in {module.rsplit(".", 1)[-1] for module in modules})
    return int(settings["r"]), float(settings["lora_alpha"]), targets


def merged_tensors(path: str | os.PathLike, config: LlamaConfig,
                   tensors: Mapping[str, LazyArray]) -> dict[str, LazyArray]:
    """A base's per-layer tensors (our layout, `read_checkpoint`) with the peft adapters at `path`
    merged in, each computed when it is loaded; one error if the adapters are for another shape."""
    rank, alpha, targets = read_settings(path)
    adapters = read_safetensors(os.fspath(storage.as_path(path) / WEIGHTS_FILE))
    merged = dict(tensors)
    for layer in range(config.n_layers):
        for target in targets:
            owner, weight, _, peft_name = lora.TARGETS[target]
            key, name = f"layers.{layer}.{owner}.{weight}", f"{PREFIX}.{layer}.{peft_name}"
            missing = [part for part in ("lora_A", "lora_B") if f"{name}.{part}.weight" not in adapters]
            if missing:
                raise ValueError(f"{path}: {name}.{missing[0]}.weight is missing; the adapters are not for a "
                                 f"{config.n_layers}-layer model")
            a, b = adapters[f"{name}.lora_A.weight"], adapters[f"{name}.lora_B.weight"]
            base = merged[key]
            inputs = int(np.prod(base.shape[: lora.TARGETS[target][2]]))
            outputs = int(np.prod(base.shape)) // inputs
            if tuple(a.shape) != (rank, inputs) or tuple(b.shape) != (outputs, rank):
                raise ValueError(f"{path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the "
                                 f"base's {weight} needs ({rank}, {inputs}) and ({outputs}, {rank}); these "
                                 "adapters are for a model of another shape")
            merged[key] = _merged(base, a, b, alpha / rank)
    return merged


def _merged(base: LazyArray, a: LazyArray, b: LazyArray, scale: float) -> LazyArray:
    def merge(weight: np.ndarray) -> np.ndarray:
        delta = a.load().astype(np.float32).T @ b.load().astype(np.float32).T  # [in, out]: lora_B·lora_A, ours
        return (weight.astype(np.float32) + scale * delta.reshape(weight.shape)).astype(weight.dtype)

    return base.then(merge)
