"""`load_pretrained`: a Meta, Hugging Face or orbax checkpoint in, a model on a mesh out.

Meta and HF weights stream in one parameter at a time: each of our stacked [L, ...] arrays is
assembled from the per-layer source tensors, placed shard by shard on the mesh, and released
before the next is read, so the host never holds the whole model twice. Our orbax checkpoints are
restored by orbax directly into their shards.

The model class follows the checkpoint: a language model loads as `Llama`, a reward model (our
`kind: reward`, HF's `LlamaForSequenceClassification`) as `LlamaRewardModel`. `kind="reward"` loads
a language model as the start of a reward model: its backbone under a new score head.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from flax import nnx

from llama2_jax import sharding, storage
from llama2_jax.checkpoint import hf, layout, meta, orbax_params
from llama2_jax.checkpoint.lazy import LazyArray
from llama2_jax.model import lora, quantize
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import MODEL_KINDS, LlamaRewardModel, Transformer, model_kind

if TYPE_CHECKING:
    from llama2_jax.data.tokenizer import Tokenizer

FORMATS = ("meta", "hf", "orbax")
READERS = {"meta": meta.read_meta, "hf": hf.read_hf, "orbax": orbax_params.read_orbax_params}
TOKENIZER_FILE = "tokenizer.model"
# What each kind of checkpoint holds, as errors name it.
KIND_NAMES = {"llama": "language model", "reward": "reward model", "actor_critic": "policy with its value model"}


def detect_format(path: str | os.PathLike) -> str:
    """`orbax` (model_config.json + state/ or a train workdir), `hf` (config.json) or `meta` (params.json)."""
    path = os.fspath(path)
    if not storage.as_path(path).is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if orbax_params.is_orbax_checkpoint(path):
        return "orbax"
    if hf.is_hf_checkpoint(path):
        return "hf"
    if meta.is_meta_checkpoint(path):
        return "meta"
    raise ValueError(
        f"{path} is not a known checkpoint format: expected Meta's params.json + consolidated.NN.pth, "
        "Hugging Face's config.json + *.safetensors, or ours (model_config.json + state/ or a train workdir)"
    )


def read_checkpoint(
    path: str | os.PathLike, format: str | None = None, **config_overrides: Any
) -> tuple[LlamaConfig, dict[str, LazyArray]]:
    """Config and every tensor in our per-layer layout, read lazily (orbax: restored to host memory).

    The config's `param_dtype` is the dtype the weights are stored in and `compute_dtype` the one
    the checkpoint records (see each format's module); `layout.kind_of(tensors)` tells the kind.
    """
    if format is not None and format not in READERS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    detected = detect_format(path)
    if format is not None and format != detected:
        raise ValueError(f"{path} is a {detected} checkpoint, not {format}")
    if detected == "orbax" and orbax_params.read_config(path)[0].lora_rank:
        # A run that trained adapters: its base and adapters merged on this host's devices.
        model = load_pretrained(path, **config_overrides)
        arrays = {name: np.asarray(array) for name, array in sharding.model_arrays(model).items()}
        return model.config, layout.unstack_layers(model.config, arrays)
    return READERS[detected](path, **config_overrides)


def checkpoint_config(path: str | os.PathLike, **config_overrides: Any) -> tuple[LlamaConfig, str]:
    """The checkpoint's config and model kind (a key of MODEL_KINDS), without reading its weights."""
    path = os.fspath(path)
    if detect_format(path) == "orbax":
        return orbax_params.read_config(path, **config_overrides)
    config, tensors = read_checkpoint(path, **config_overrides)  # lazy: headers only
    return config, layout.kind_of(tensors)


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    kind: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Transformer:
    """The checkpoint's model (`Llama` or `LlamaRewardModel`), sharded over `mesh` (default: all
    local devices) by the logical-axis `rules`: laid out exactly as a train state under those rules.

    `kind` (a key of MODEL_KINDS) asks for a model of that kind instead: a language model loads as a
    reward model by keeping its backbone and starting a new score head (`LlamaRewardModel`'s own
    initialisation, drawn from `seed`); a reward model has no next-token head to become a language
    model. None: the checkpoint's own kind.

    As in Flax, `dtype` is the computation dtype (default: the one the checkpoint records) and
    `param_dtype` the dtype the weights are kept in (default: the checkpoint's own, e.g. bfloat16
    for Meta's files; pass float32 for training master weights). `config_overrides` set LlamaConfig
    fields that do not change shapes, e.g. `attention="cudnn"`, `max_seq_len` (Meta's params.json
    does not record the context length, so it defaults to 4096).
    """
    path = os.fspath(path)
    format = detect_format(path)
    if dtype is not None:
        if "compute_dtype" in config_overrides:
            raise ValueError("the compute dtype is given twice, as dtype= and compute_dtype=; pass one")
        config_overrides["compute_dtype"] = np.dtype(dtype).name
    if param_dtype is not None:
        config_overrides["param_dtype"] = np.dtype(param_dtype).name
    if mesh is None:
        mesh = sharding.make_mesh(devices=jax.local_devices())
    if format == "orbax":
        model = _restore_orbax(path, mesh, rules, config_overrides)
    else:
        config, tensors = read_checkpoint(path, format, **config_overrides)
        stacked = layout.stack_layers(config, tensors, dtype=config.param_dtype)
        model = sharding.model_from_arrays(
            config,
            mesh,
            {name: lazy.load for name, lazy in stacked.items()},
            rules,
            model_class=MODEL_KINDS[layout.kind_of(tensors)],
        )
    saved_kind = model_kind(type(model))
    if kind is None or kind == saved_kind:
        return model
    layout.check_kind(kind)
    if (saved_kind, kind) != ("llama", "reward"):
        raise ValueError(
            f"{path} holds a {saved_kind} model, which has no next-token head to load as a {kind} "
            "model; load it as it is, or give a language model checkpoint"
        )
    return with_new_parameters(model, model.config, LlamaRewardModel, mesh, rules, seed)


def score_head(path: str | os.PathLike, mesh: jax.sharding.Mesh) -> jax.Array:
    """A reward model's score head ([dim, 1], float32) on every device of `mesh`: from our
    checkpoints, read alone; from other formats, out of the whole model."""
    path = os.fspath(path)
    if detect_format(path) != "orbax":
        model = load_pretrained(path, mesh=mesh)
        if not isinstance(model, LlamaRewardModel):
            raise ValueError(f"{path} holds a {model_kind(type(model))} model, not a reward model; give a reward model")
        return jax.device_put(model.score.kernel[...].astype(jnp.float32), NamedSharding(mesh, PartitionSpec()))
    config, kind = orbax_params.read_config(path)
    if kind != "reward":
        raise ValueError(f"{path} holds a {kind} model, not a reward model; give a reward model")
    head = "score.kernel"
    wanted = jax.ShapeDtypeStruct((config.dim, 1), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    return orbax_params.restore_subset(orbax_params.state_path(path), {head: wanted})[head]


def with_new_parameters(model: nnx.Module, config: LlamaConfig, model_class: type, mesh: jax.sharding.Mesh,
                        rules, seed: int) -> nnx.Module:
    """A `model_class` of `config` holding `model`'s arrays (as they are laid out, cast to the new
    model's dtypes, quantized where `config` quantizes a float weight), and for each parameter
    `model` lacks (a reward model's score head, low-rank adapters) the value a new
    `model_class(config)` draws from `seed`."""
    graphdef, abstract_state = sharding.abstract_model(config, model_class)
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh, rules)))
    kept = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    kept.update(_quantized(kept, abstract_state, shardings, config))
    new = [path for path, _ in nnx.to_flat_state(abstract_state) if path not in kept]

    def draw():  # only the new parameters leave: the compiler drops the rest of the initialisation
        drawn = dict(nnx.to_flat_state(nnx.state(model_class(config, rngs=nnx.Rngs(seed)))))
        return [drawn[path][...] for path in new]

    drawn = dict(zip(new, jax.jit(draw, out_shardings=[shardings[path].get_value() for path in new])()))
    placed = [
        (path, abstract.replace(drawn[path] if path in drawn else kept[path][...].astype(abstract.dtype)))
        for path, abstract in nnx.to_flat_state(abstract_state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def _quantized(kept: dict, abstract_state: nnx.State, shardings: dict, config: LlamaConfig) -> dict:
    """The integer levels and scales of each float weight in `kept` that `abstract_state` holds
    quantized, laid out as the abstract state says."""
    found = {}
    for path, abstract in nnx.to_flat_state(abstract_state):
        weight_path = (*path[:-1], str(path[-1]).removesuffix("_scale"))
        if weight_path == path or weight_path not in kept or path in kept:
            continue
        weight = kept[weight_path]
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            continue
        quantized = jax.jit(quantize.quantize, static_argnums=(1, 2),
                            out_shardings=(shardings[weight_path].get_value(), shardings[path].get_value()))
        found[weight_path], found[path] = (
            nnx.Param(array) for array in quantized(weight[...], quantize.OUTPUT_AXES[weight_path[-1]],
                                                     config.quantized_dtype))
    return found


def _restore_orbax(
    path: str, mesh: jax.sharding.Mesh, rules, config_overrides: dict
) -> Transformer:
    config, kind = orbax_params.read_config(path, **config_overrides)
    if config.lora_rank:
        return lora.merged(_restore_adapted(path, config, kind, mesh, rules), config.param_dtype)
    sharding.check_platform(config, mesh)
    graphdef, abstract_state = sharding.abstract_model(config, MODEL_KINDS[kind])
    sharding.check_fits_mesh(abstract_state, mesh, rules)
    flat_shardings = nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh, rules))
    shardings = {".".join(map(str, key)): variable.get_value() for key, variable in flat_shardings}
    restored = orbax_params.restore_sharded(
        orbax_params.state_path(path), config, kind, shardings, config.param_dtype
    )
    placed = [
        (key, variable.replace(restored[".".join(map(str, key))]))
        for key, variable in nnx.to_flat_state(abstract_state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def _restore_adapted(path: str, config: LlamaConfig, kind: str, mesh: jax.sharding.Mesh, rules) -> Transformer:
    """A run that trained adapters: its base, read again from where the run read it (and checked
    to be the same by its fingerprint), with the trained adapters and head from its checkpoint."""
    from llama2_jax.train import lora_runs
    from llama2_jax.train.state import split_model

    record = orbax_params.read_base_record(path)
    if record is None:
        raise ValueError(f"{path}/model_config.json describes a model with adapters but names no base "
                         f"({orbax_params.BASE_KEY}); it was not written by a training run here")
    if not storage.as_path(record["path"]).exists():
        raise FileNotFoundError(f"the base model of {path} is not at {record['path']} any more; put it back there, "
                                "or export the run where the base is (convert --from orbax)")
    base = load_pretrained(record["path"], config.compute_dtype, param_dtype=config.base_dtype, mesh=mesh,
                           rules=rules, kind=kind, attention=config.attention, remat=config.remat,
                           max_seq_len=config.max_seq_len)
    model = with_new_parameters(base, config, MODEL_KINDS[kind], mesh, rules, seed=0)
    graphdef, trained, frozen = split_model(model, config)
    found = lora_runs.fingerprint(nnx.to_pure_dict(frozen))
    if found != record["fingerprint"]:
        raise ValueError(f"the base at {record['path']} (fingerprint {found}) is not the one {path} trained its "
                         f"adapters on (fingerprint {record['fingerprint']}); restore that base there")
    abstract = {".".join(map(str, key)): jax.ShapeDtypeStruct(variable.shape, variable.dtype,
                                                              sharding=variable[...].sharding)
                for key, variable in nnx.to_flat_state(trained)}
    restored = orbax_params.restore_subset(orbax_params.state_path(path), abstract)
    placed = [(key, variable.replace(restored[".".join(map(str, key))]))
              for key, variable in nnx.to_flat_state(trained)]
    return nnx.merge(graphdef, nnx.from_flat_state(placed), frozen)


def tokenizer_file(path: str | os.PathLike, format: str) -> str | None:
    """The checkpoint's `tokenizer.model`: in its directory, or for Meta's layout (one directory
    per model size, the tokenizer shared beside them) in its parent. None if there is none."""
    candidates = _tokenizer_candidates(path, format)
    return next((os.fspath(candidate) for candidate in candidates if candidate.is_file()), None)


def _tokenizer_candidates(path: str | os.PathLike, format: str) -> list[epath.Path]:
    directory = storage.as_path(path)
    candidates = [directory / TOKENIZER_FILE]
    if format == "meta":
        candidates.append(directory.parent / TOKENIZER_FILE)
    return candidates


def load_tokenizer(
    checkpoint_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Tokenizer:
    """The `Tokenizer` at `tokenizer_path`, else the checkpoint's own (`tokenizer_file`)."""
    # The data package brings grain along; importing it here keeps loading weights light.
    from llama2_jax.data.tokenizer import Tokenizer

    checkpoint_path = os.fspath(checkpoint_path)
    format = detect_format(checkpoint_path)
    if tokenizer_path:
        return Tokenizer(tokenizer_path)
    found = tokenizer_file(checkpoint_path, format)
    if found is None:
        # Many Hugging Face repositories ship only the `tokenizers` library's tokenizer.json; the
        # SentencePiece model Llama's tokenizers are made of is its tokenizer.model.
        fast_only = (storage.as_path(checkpoint_path) / "tokenizer.json").exists()
        raise FileNotFoundError(
            f"no tokenizer found with checkpoint {checkpoint_path} (looked for "
            f"{', '.join(map(os.fspath, _tokenizer_candidates(checkpoint_path, format)))}"
            f"{'; it has tokenizer.json, which is not read here' if fast_only else ''}); copy the model's "
            f"{TOKENIZER_FILE} there or pass --tokenizer PATH to the SentencePiece .model file it was trained with"
        )
    return Tokenizer(found)


def load_with_tokenizer(
    path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, dtype: Any = None,
    *, param_dtype: Any = None,
) -> tuple[Transformer, Tokenizer]:
    """The checkpoint's model and its tokenizer (`load_tokenizer`), checked to fit each other."""
    tokenizer = load_tokenizer(path, tokenizer_path)
    model = load_pretrained(path, dtype, param_dtype=param_dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; pass the --tokenizer the checkpoint was trained with"
        )
    return model, tokenizer
