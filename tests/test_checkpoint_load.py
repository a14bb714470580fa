"""`load_pretrained`'s dtypes and shardings, conversions that compute like their source, and the
tokenizer that travels with a checkpoint."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import sharding
from llama2_jax.checkpoint import convert
from llama2_jax.checkpoint.load import load_pretrained, load_tokenizer
from llama2_jax.model import axes
from llama2_jax.sharding import MeshConfig, make_mesh, model_arrays

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOKENIZER = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "llama2_jax", "assets", "tokenizer", "shakespeare_4096.model"
)
# Not the defaults: the model dimension over both fsdp and tensor, the MLP and vocab over data.
RULES = (
    (axes.VOCAB, "data"),
    (axes.EMBED, ("fsdp", "tensor")),
    (axes.Q_HEADS, None),
    (axes.KV_HEADS, None),
    (axes.HEAD_DIM, None),
    (axes.MLP, "data"),
    (axes.LAYERS, None),
    (axes.NORM, None),
)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))


@pytest.fixture(scope="module")
def tokens():
    return np.load(os.path.join(FIXTURES, "gqa", "tokens.npy"))


def fixture(*parts):
    return os.path.join(FIXTURES, *parts)


# ---- dtypes -------------------------------------------------------------------------------------


def test_dtype_is_the_computation_dtype_and_param_dtype_the_storage(mesh):
    stored = load_pretrained(fixture("gqa", "hf"), mesh=mesh)
    assert (stored.config.compute_dtype, stored.config.param_dtype) == ("float32", "float32")
    model = load_pretrained(fixture("gqa", "hf"), jnp.bfloat16, mesh=mesh)
    assert (model.config.compute_dtype, model.config.param_dtype) == ("bfloat16", "float32")
    assert {a.dtype for a in model_arrays(model).values()} == {np.dtype("float32")}
    model = load_pretrained(fixture("gqa", "meta"), param_dtype=jnp.bfloat16, mesh=mesh)
    assert (model.config.compute_dtype, model.config.param_dtype) == ("float32", "bfloat16")
    assert {a.dtype for a in model_arrays(model).values()} == {np.dtype(jnp.bfloat16)}


def test_a_dtype_given_twice_is_an_error():
    with pytest.raises(ValueError, match="compute dtype is given twice"):
        load_pretrained(fixture("gqa", "hf"), jnp.float32, compute_dtype="bfloat16")


def test_hf_and_meta_without_a_dtype_compute_in_their_storage_dtype(tmp_path, mesh):
    convert.convert(fixture("gqa", "hf"), "hf", str(tmp_path / "hf"), "hf", dtype="bfloat16")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["dtype"] == hf_config["torch_dtype"] == "float32"  # the source's compute dtype
    for key in ("dtype", "torch_dtype"):
        del hf_config[key]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    assert load_pretrained(tmp_path / "hf", mesh=mesh).config.compute_dtype == "bfloat16"
    convert.convert(str(tmp_path / "hf"), "hf", str(tmp_path / "meta"), "meta")
    assert load_pretrained(tmp_path / "meta", mesh=mesh).config.compute_dtype == "bfloat16"


# ---- conversions compute like their source ------------------------------------------------------


@pytest.mark.parametrize(
    "via, param_dtype, compute_dtype",
    [
        ("hf", "float32", "float32"),
        ("meta", "float32", "float32"),
        ("hf", "float32", "bfloat16"),
    ],
)
def test_ours_to_another_format_and_back_gives_bit_identical_logits(
    tmp_path, mesh, tokens, via, param_dtype, compute_dtype
):
    model = load_pretrained(fixture("gqa", "hf"), compute_dtype, param_dtype=param_dtype, mesh=mesh)
    convert.export_model(model, str(tmp_path / "ours"), "orbax")
    convert.convert(str(tmp_path / "ours"), "orbax", str(tmp_path / via), via)
    convert.convert(str(tmp_path / via), via, str(tmp_path / "back"), "orbax")
    reloaded = load_pretrained(tmp_path / "back", mesh=mesh)
    assert (reloaded.config.compute_dtype, reloaded.config.param_dtype) == (compute_dtype, param_dtype)
    assert np.array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))


# ---- placement by the run's rules ---------------------------------------------------------------


@pytest.mark.parametrize("format", ["hf", "meta", "orbax"])
def test_weights_are_placed_by_the_given_rules(tmp_path, mesh, format):
    path = fixture("gqa", format)
    if format == "orbax":
        path = str(tmp_path / "orbax")
        convert.convert(fixture("gqa", "hf"), "hf", path, "orbax")
    model = load_pretrained(path, mesh=mesh, rules=RULES)
    expected = nnx.to_flat_state(sharding.state_shardings(nnx.state(model, nnx.Param), mesh, RULES))
    placed = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, where in expected:
        assert placed[key][...].sharding == where.get_value(), key
    assert placed[("layers", "feed_forward", "w1")][...].sharding.spec[1:] == (("fsdp", "tensor"), "data")
    default = load_pretrained(path, mesh=mesh)
    assert nnx.state(default, nnx.Param)["layers"]["feed_forward"]["w1"][...].sharding.spec[2] == "tensor"


# ---- tokenizers ---------------------------------------------------------------------------------


def test_load_tokenizer_checks_the_checkpoint_before_the_tokenizer(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {missing} does not exist"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"looked for .*hf/tokenizer.model\); copy the model's "
                                                r"tokenizer.model there or pass --tokenizer"):
        load_tokenizer(fixture("gqa", "hf"))
    fast_only = tmp_path / "fast_only"
    shutil.copytree(fixture("gqa", "hf"), fast_only)
    (fast_only / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="it has tokenizer.json, which is not read here"):
        load_tokenizer(fast_only)
    assert str(load_tokenizer(fixture("gqa", "hf"), TOKENIZER).path) == TOKENIZER


def test_load_tokenizer_finds_it_beside_the_weights_or_above_metas(tmp_path):
    shutil.copytree(fixture("gqa", "meta"), tmp_path / "llama-2-7b")
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")  # Meta's layout: shared by every size
    assert load_tokenizer(tmp_path / "llama-2-7b").path == tmp_path / "tokenizer.model"
    shutil.copytree(fixture("gqa", "hf"), tmp_path / "hf")
    shutil.copy(TOKENIZER, tmp_path / "hf" / "tokenizer.model")
    assert load_tokenizer(tmp_path / "hf").path == tmp_path / "hf" / "tokenizer.model"


def test_conversions_and_exports_carry_the_tokenizer(tmp_path, mesh):
    shutil.copytree(fixture("gqa", "meta"), tmp_path / "meta")
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    original = (tmp_path / "tokenizer.model").read_bytes()
    convert.convert(str(tmp_path / "meta"), "meta", str(tmp_path / "hf"), "hf")
    convert.convert(str(tmp_path / "hf"), "hf", str(tmp_path / "ours"), "orbax")
    convert.convert(str(tmp_path / "ours"), "orbax", str(tmp_path / "meta2"), "meta")
    for target in ("hf", "ours", "meta2"):
        assert (tmp_path / target / "tokenizer.model").read_bytes() == original, target

    convert.convert(fixture("gqa", "hf"), "hf", str(tmp_path / "bare"), "meta")
    assert not (tmp_path / "bare" / "tokenizer.model").exists()  # the source has none

    model = load_pretrained(tmp_path / "hf", mesh=mesh)
    for format in ("hf", "meta", "orbax"):
        target = tmp_path / f"export_{format}"
        convert.export_model(model, str(target), format, str(tmp_path / "tokenizer.model"))
        assert (target / "tokenizer.model").read_bytes() == original, format
