"""llama2_jax: the Llama 2 recipe in JAX and Flax NNX, on data/fsdp/tensor meshes.

The public API is small; names are imported on first use so `import llama2_jax` stays light.
"""

import importlib

_PUBLIC = {
    "LlamaConfig": "llama2_jax.model.config",
    "Llama": "llama2_jax.model.llama",
    "LlamaRewardModel": "llama2_jax.model.llama",
    "param_count": "llama2_jax.model.llama",
    "make_mesh": "llama2_jax.sharding",
    "create_model": "llama2_jax.sharding",
    "load_pretrained": "llama2_jax.checkpoint.load",
    "Tokenizer": "llama2_jax.data.tokenizer",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'llama2_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
