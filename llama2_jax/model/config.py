"""Model shapes: the paper's sizes (docs/recipe.md), small presets for tests and the demo, any custom shape."""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# The weights adapters can adapt (model/lora.py): attention's projections and the MLP's, all by
# default, as QLoRA found best.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_BASE_DTYPES = ("", "float32", "bfloat16", "float16", "int8", "int4")  # integers: QLoRA (model/quantize.py)
QUANTIZED_BASE_DTYPES = ("int8", "int4")
# What the backward pass keeps from the forward pass of a block instead of recomputing it: the name of a
# `jax.checkpoint_policies` policy, or None for no rematerialisation at all.
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "minimal": "dots_with_no_batch_dims_saveable",  # keep the weight matmuls' outputs, recompute the rest
    "save_dots": "dots_saveable",  # keep every matmul's output, attention scores included
    "full": "nothing_saveable",  # keep only each block's input
}


def lora_problems(rank, alpha, targets, base_dtype, dropout=0.0) -> list[str]:
    """What is wrong with adapter settings, in the `lora` config section's words."""
    problems = []
    if not 0 <= dropout < 1:
        problems.append(f"lora.dropout is {dropout}; the share of an adapter's inputs dropped in training is in [0, 1) "
                        "(0.05 or 0.1 is usual)")
    if rank < 0:
        problems.append(f"lora.rank is {rank}; 0 trains every weight, a positive rank trains adapters of that rank")
    if rank > 0 and not alpha > 0:
        problems.append(f"lora.alpha is {alpha}; the adapters' scale alpha / rank needs alpha > 0 (16 is usual)")
    unknown = [target for target in targets if target not in LORA_TARGETS]
    if unknown or (rank > 0 and not targets):
        problems.append(f"lora.targets {tuple(targets)} holds {'unknown ' + str(unknown) if unknown else 'nothing'}; "
                        f"choose among {LORA_TARGETS}")
    if base_dtype not in LORA_BASE_DTYPES:
        problems.append(f"lora.base_dtype is {base_dtype!r}; choose one of {LORA_BASE_DTYPES} (empty: the compute "
                        "dtype)")
    return problems


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rounding rule: 2/3 of 4·dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# The fields that say what a model is, as its checkpoint records them; the others (dtypes, attention
# kernel, remat) say how a run computes with it.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                       "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Everything that fixes the model's shape and numerics.

    `param_dtype` is what the weights are stored in (float32 master weights for training);
    `compute_dtype` is what matmuls run in. RMSNorm, softmax and logits stay float32 regardless.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention: str = "xla"
    remat: str = "none"
    # Low-rank adapters (model/lora.py): rank 0 is none. With adapters, the base weights are frozen
    # and stored in `lora_base_dtype` (empty: the compute dtype; int8 or int4: the projections
    # quantized, model/quantize.py), the adapters in `param_dtype`.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_base_dtype: str = ""
    lora_dropout: float = 0.0  # in training steps only (lora.dropout_keys); sampling and scoring never drop

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a JSON list, read back
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(
                f"attention={self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
        if min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.max_seq_len) <= 0:
            problems.append("vocab_size, dim, n_layers, n_heads and max_seq_len must be positive")
        problems += lora_problems(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_base_dtype,
                                  self.lora_dropout)
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def base_dtype(self) -> str:
        """What the weights other than adapters (and a reward model's head) are stored in; under a
        quantized base, the float weights that stay float (embedding, norms, output head)."""
        if not self.lora_rank:
            return self.param_dtype
        if self.lora_base_dtype in QUANTIZED_BASE_DTYPES:
            return self.compute_dtype
        return self.lora_base_dtype or self.compute_dtype

    @property
    def quantized_dtype(self) -> str | None:
        """int8 or int4 when the blocks' projection weights are stored quantized (model/quantize.py)."""
        return self.lora_base_dtype if self.lora_rank and self.lora_base_dtype in QUANTIZED_BASE_DTYPES else None

    def without_adapters(self) -> "LlamaConfig":
        """The same model with its adapters merged away: weights in the adapters' dtype."""
        return self.replace(lora_rank=0, lora_base_dtype="", lora_dropout=0.0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named size (`tiny`, `small`, `7b`, `13b`, `34b`, `70b`) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    # Meta's params.json and Hugging Face's config.json describe the same shape in other words.

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], **overrides: Any) -> "LlamaConfig":
        fields = dict(
            vocab_size=params["vocab_size"],
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
        )
        return cls(**{**fields, **overrides})

    def to_meta_params(self) -> dict[str, Any]:
        params = dict(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=self.vocab_size,
            multiple_of=self.multiple_of,
            ffn_dim_multiplier=self.ffn_dim_multiplier,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
        )
        return {key: value for key, value in params.items() if value is not None}

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "LlamaConfig":
        """Hugging Face stores the FFN width itself; find Meta's (multiple_of, multiplier) that give it.

        The dtype HF runs the model in (`dtype`, `torch_dtype` before transformers 5) is our
        compute dtype; a file that names none leaves it to `overrides` (the storage dtype: hf.py).
        """
        dim, ffn_dim = hf["hidden_size"], hf["intermediate_size"]
        multiple_of, multiplier = _meta_ffn_parameters(dim, ffn_dim)
        fields = dict(
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0),
            max_seq_len=hf.get("max_position_embeddings", 4096),
        )
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype")
        if hf_dtype:
            fields["compute_dtype"] = _hf_dtype_name(hf_dtype)
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            # What HF runs the model in, i.e. our compute dtype; transformers < 5 reads "torch_dtype".
            "dtype": self.compute_dtype,
            "torch_dtype": self.compute_dtype,
        }


HF_DTYPES = ("float32", "bfloat16", "float16")


def _hf_dtype_name(hf_dtype: str) -> str:
    """`bfloat16` or `torch.bfloat16` (older exporters) -> `bfloat16`."""
    name = str(hf_dtype).removeprefix("torch.")
    if name not in HF_DTYPES:
        raise ValueError(f"Hugging Face dtype {hf_dtype!r} is not one of {HF_DTYPES}")
    return name


def _meta_ffn_parameters(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """The simplest Meta parameters that reproduce a given FFN width exactly."""
    for multiple_of in (256, 4096, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_hidden_dim(dim, multiple_of, None) == ffn_dim:
            return multiple_of, None
    # An explicit multiplier with multiple_of 1 reproduces any width: int(m * h) == ffn_dim.
    base = int(2 * 4 * dim / 3)
    multiplier = ffn_dim / base
    while int(multiplier * base) < ffn_dim:
        multiplier = float(multiplier + 1e-12)
    return 1, multiplier


PRESETS: dict[str, LlamaConfig] = {
    # Tests: compiles in seconds, every axis divisible by the test meshes (8 devices).
    "tiny": LlamaConfig(
        vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=32,
        max_seq_len=256,
    ),
    # The demo: learns Shakespeare's surface form in minutes on two CPU cores.
    "small": LlamaConfig(
        vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, multiple_of=64,
        max_seq_len=512,
    ),
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256),
    "34b": LlamaConfig(
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0
    ),
    "70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
}
