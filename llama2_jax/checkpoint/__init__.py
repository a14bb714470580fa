"""Checkpoints: training checkpoints (manager.py) and Meta / Hugging Face / orbax weights in and out.

    load_pretrained(path, dtype=None, *, param_dtype=None, mesh=None, rules=DEFAULT_RULES, kind=None)
        any of the three formats -> a Llama or LlamaRewardModel on a mesh (kind="reward": a
        language model's backbone under a new score head)
    load_tokenizer(path, tokenizer_path=None)
        the tokenizer that came with a checkpoint
    export_model(model, path, "meta" | "hf" | "orbax", tokenizer_path=None)
        a live model -> files
    convert.convert(src, "hf", dst, "meta")
        file to file, streamed tensor by tensor
    read_checkpoint(path) / detect_format(path)
        config + lazy per-layer tensors
    checkpoint_config(path)
        config + model kind, no weights read

Reading PyTorch `.pth` and `.safetensors` files needs neither PyTorch nor the safetensors package
(torch_pickle.py, safetensors.py). Names resolve on first use so importing the package stays light.
"""

import importlib

_PUBLIC = {
    "load_pretrained": "llama2_jax.checkpoint.load",
    "read_checkpoint": "llama2_jax.checkpoint.load",
    "detect_format": "llama2_jax.checkpoint.load",
    "checkpoint_config": "llama2_jax.checkpoint.load",
    "load_tokenizer": "llama2_jax.checkpoint.load",
    "export_model": "llama2_jax.checkpoint.convert",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'llama2_jax.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
