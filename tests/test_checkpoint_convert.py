"""Checkpoint import/export: parity with the reference implementation, bit-exact round trips, bad input.

The fixtures in tests/fixtures/ were made by scripts/make_parity_fixtures.py with PyTorch and
transformers (tiny random float32 models, multi-head and grouped-query, in HF single/sharded and
Meta single/2-shard form, plus transformers' logits), so these tests need neither. The last test
uses torch and transformers directly when they are installed. Reward models: test_checkpoint_kinds.py;
dtypes, shardings and tokenizers: test_checkpoint_load.py.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama2_jax.checkpoint import convert
from llama2_jax.checkpoint.load import detect_format, load_pretrained, read_checkpoint
from llama2_jax.checkpoint.manager import write_run_files
from llama2_jax.checkpoint.orbax_params import nest
from llama2_jax.checkpoint.safetensors import read_safetensors, write_safetensors
from llama2_jax.checkpoint.torch_pickle import read_pth, write_pth
from llama2_jax.sharding import MeshConfig, make_mesh, model_arrays

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONFIGS = ("mha", "gqa")
LAYOUTS = ("hf", "hf_sharded", "meta", "meta_2shard")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))


def fixture(name, *parts):
    return os.path.join(FIXTURES, name, *parts)


def copy_fixture(tmp_path, name, layout_name):
    target = tmp_path / layout_name
    shutil.copytree(fixture(name, layout_name), target)
    return target


# ---- file formats --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_pth_and_safetensors_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {
        "matrix": rng.standard_normal((3, 5)).astype(dtype),
        "vector": rng.standard_normal(7).astype(dtype),
    }
    write_pth(tmp_path / "state.pth", tensors)
    write_safetensors(tmp_path / "state.safetensors", tensors, {"format": "pt"})
    for read in (
        read_pth(tmp_path / "state.pth"),
        read_safetensors(tmp_path / "state.safetensors"),
    ):
        assert set(read) == set(tensors)
        for name, array in tensors.items():
            loaded = read[name].load()
            assert loaded.dtype == array.dtype and np.array_equal(
                loaded.view(np.uint8), array.view(np.uint8)
            )


def test_pth_reader_refuses_code_in_the_pickle(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": Exploit()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_pth(tmp_path / "evil.pth")


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones((64, 64), np.float32)})
    with open(tmp_path / "a.safetensors", "r+b") as file:
        file.truncate(1000)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_safetensors(tmp_path / "a.safetensors")


# ---- parity with transformers' LlamaForCausalLM ----------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_logits_match_transformers(mesh, name, layout_name):
    model = load_pretrained(fixture(name, layout_name), jnp.float32, mesh=mesh)
    tokens = np.load(fixture(name, "tokens.npy"))
    expected = np.load(fixture(name, "logits.npy"))
    logits = np.asarray(model(tokens))
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_every_fixture_layout_holds_the_same_tensors():
    for name in CONFIGS:
        _, reference = read_checkpoint(fixture(name, "hf"))
        for layout_name in LAYOUTS[1:]:
            _, tensors = read_checkpoint(fixture(name, layout_name))
            for key, tensor in reference.items():
                assert np.array_equal(tensor.load(), tensors[key].load()), (layout_name, key)


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, options, param_dtype",
    [
        ("hf", {}, "float32"),
        ("hf", {"max_shard_bytes": 40_000}, "bfloat16"),
        ("meta", {}, "float32"),
        ("meta", {"meta_shards": 2}, "bfloat16"),
        ("orbax", {}, "bfloat16"),
    ],
)
def test_round_trip_through_each_format_is_bit_exact(tmp_path, mesh, target, options, param_dtype):
    # Meta's files cannot say what to compute in: a Meta checkpoint computes in its storage dtype.
    model = load_pretrained(fixture("gqa", "hf"), param_dtype, param_dtype=param_dtype, mesh=mesh)
    convert.export_model(model, str(tmp_path / target), target, **options)
    assert detect_format(tmp_path / target) == target
    reloaded = load_pretrained(tmp_path / target, mesh=mesh)
    # Meta's params.json has no context length: the model default stands in for the fixture's 64.
    assert reloaded.config.replace(max_seq_len=model.config.max_seq_len) == model.config
    before, after = model_arrays(model), model_arrays(reloaded)
    for key, array in before.items():
        assert after[key].dtype == array.dtype, key
        assert np.array_equal(np.asarray(after[key]), np.asarray(array)), key
        assert after[key].sharding == array.sharding, key


def test_loads_the_newest_step_of_a_training_workdir(tmp_path, mesh):
    model = load_pretrained(fixture("mha", "hf"), mesh=mesh)
    arrays = model_arrays(model)
    write_run_files(str(tmp_path), {}, model.config.to_dict(), None, "llama")
    for step in (1, 2):  # the layout checkpoint/manager.py writes: params beside optimizer state
        state = {
            "step": step,
            "params": nest({k: v * step for k, v in arrays.items()}),
            "opt_state": {},
        }
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / "checkpoints" / str(step) / "state", state)
        checkpointer.wait_until_finished()
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert detect_format(tmp_path) == "orbax"
    loaded = model_arrays(load_pretrained(tmp_path, mesh=mesh))
    for key, array in arrays.items():
        assert np.array_equal(np.asarray(loaded[key]), 2 * np.asarray(array)), key


def test_converts_hf_to_sharded_meta_like_the_reference(tmp_path):
    source = fixture("gqa", "hf_sharded")
    convert.convert(source, "hf", str(tmp_path / "meta"), "meta", meta_shards=2)
    for rank in range(2):
        ours = read_pth(tmp_path / "meta" / f"consolidated.{rank:02d}.pth")
        reference = read_pth(fixture("gqa", "meta_2shard", f"consolidated.{rank:02d}.pth"))
        assert set(ours) == set(reference)
        for name, tensor in reference.items():
            assert np.array_equal(ours[name].load(), tensor.load()), name
    convert.convert(str(tmp_path / "meta"), "meta", str(tmp_path / "hf"), "hf")
    ours, reference = (
        read_safetensors(tmp_path / "hf" / "model.safetensors"),
        read_safetensors(fixture("gqa", "hf", "model.safetensors")),
    )
    assert set(ours) == set(reference)
    assert all(np.array_equal(ours[name].load(), reference[name].load()) for name in reference)


def test_convert_casts_and_refuses_to_overwrite(tmp_path):
    target = str(tmp_path / "hf16")
    config, _ = convert.convert(fixture("mha", "meta"), "meta", target, "hf", dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert {
        t.dtype for t in read_safetensors(os.path.join(target, "model.safetensors")).values()
    } == {np.dtype(ml_dtypes.bfloat16)}
    with pytest.raises(FileExistsError, match="not empty"):
        convert.convert(fixture("mha", "meta"), "meta", target, "hf")


def test_package_never_imports_torch_or_transformers():
    code = (
        "import sys, llama2_jax.checkpoint.convert, llama2_jax.checkpoint.load; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'jinja2') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    ).stdout
    assert output.strip() == "[]"


# ---- bad input ---------------------------------------------------------------------------------


def test_shape_that_does_not_match_the_config_names_tensor_and_shapes(tmp_path):
    checkpoint = copy_fixture(tmp_path, "mha", "hf")
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 128
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 32\).*needs \(128, 32\)",
    ):
        load_pretrained(checkpoint)


def test_meta_shape_mismatch_names_tensor(tmp_path):
    checkpoint = copy_fixture(tmp_path, "gqa", "meta")
    params = json.loads((checkpoint / "params.json").read_text())
    params["n_kv_heads"] = 4
    (checkpoint / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        ValueError, match=r"layers\.0\.attention\.wk\.weight has shape \(16, 32\).*needs \(32, 32\)"
    ):
        read_checkpoint(checkpoint)


def test_missing_shard_files_are_named(tmp_path):
    meta_checkpoint = copy_fixture(tmp_path, "gqa", "meta_2shard")
    os.remove(meta_checkpoint / "consolidated.01.pth")
    with pytest.raises(FileNotFoundError, match="shard files are missing"):
        read_checkpoint(meta_checkpoint)
    shutil.copy(meta_checkpoint / "consolidated.00.pth", meta_checkpoint / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth"):
        read_checkpoint(meta_checkpoint)
    hf_checkpoint = copy_fixture(tmp_path, "gqa", "hf_sharded")
    os.remove(hf_checkpoint / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_pretrained(hf_checkpoint)


def test_unknown_or_missing_path_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a known checkpoint format"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a hf checkpoint, not meta"):
        read_checkpoint(fixture("mha", "hf"), "meta")


# ---- against the reference implementations directly (only where installed) ---------------------


def test_against_torch_and_transformers_directly(tmp_path, mesh):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)
    reference.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, 96, (2, 10))
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).logits.numpy()

    model = load_pretrained(tmp_path / "hf", jnp.float32, mesh=mesh)
    np.testing.assert_allclose(np.asarray(model(tokens)), expected, atol=1e-4, rtol=0)

    # Our exports, read back by the reference code: Meta files via torch.load, HF via from_pretrained.
    convert.export_model(model, str(tmp_path / "meta"), "meta", meta_shards=2)
    for rank in range(2):
        state = torch.load(
            tmp_path / "meta" / f"consolidated.{rank:02d}.pth", weights_only=True, mmap=True
        )
        ours = read_pth(tmp_path / "meta" / f"consolidated.{rank:02d}.pth")
        assert all(np.array_equal(state[name].numpy(), ours[name].load()) for name in ours)
    convert.export_model(model, str(tmp_path / "hf_out"), "hf", max_shard_bytes=30_000)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_out").float().eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(torch.from_numpy(tokens)).logits.numpy(), expected, atol=1e-5, rtol=0
        )
