"""The Llama 2 model: shapes, modules and attention kernels."""

from llama2_jax.model.config import PRESETS, LlamaConfig
from llama2_jax.model.llama import KVCache, Llama, LlamaRewardModel, param_count

__all__ = ["PRESETS", "KVCache", "Llama", "LlamaConfig", "LlamaRewardModel", "param_count"]
