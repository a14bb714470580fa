"""Reward models in the checkpoint layer: saved, restored and converted like the language model.

Hugging Face holds them as a `LlamaForSequenceClassification` with one label; the fixture
tests/fixtures/reward/ (scripts/make_parity_fixtures.py) carries transformers' float32 scores for
right- and left-padded rows; our model sees the padding as segment id 0 and, like transformers,
numbers positions 0..length-1 across it. Meta's format has no reward head.
"""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from llama2_jax import sharding
from llama2_jax.checkpoint import convert, layout
from llama2_jax.checkpoint.load import checkpoint_config, load_pretrained, read_checkpoint
from llama2_jax.checkpoint.manager import write_run_files
from llama2_jax.checkpoint.orbax_params import nest
from llama2_jax.checkpoint.safetensors import read_safetensors
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import MODEL_KINDS, Llama, LlamaRewardModel
from llama2_jax.sharding import MeshConfig, make_mesh, model_arrays
from tolerances import assert_close_at_scale

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REWARD = os.path.join(FIXTURES, "reward")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))


@pytest.fixture(scope="module")
def reward_model(mesh):
    return load_pretrained(os.path.join(REWARD, "hf"), mesh=mesh)


def _scores(model, tokens):
    return np.asarray(model(tokens, segment_ids=(tokens != 0).astype(np.int32)))


def _assert_same_params(model, other):
    before, after = model_arrays(model), model_arrays(other)
    assert set(before) == set(after)
    for key, array in before.items():
        assert after[key].dtype == array.dtype, key
        assert np.array_equal(np.asarray(after[key]), np.asarray(array)), key


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_layout_describes_every_model_kind(kind):
    config = LlamaConfig.from_preset("tiny")
    _, abstract_state = sharding.abstract_model(config, MODEL_KINDS[kind])
    shapes = {
        ".".join(map(str, path)): tuple(variable.shape)
        for path, variable in nnx.to_flat_state(abstract_state)
    }
    assert shapes == layout.stacked_shapes(config, kind)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_scores_match_transformers_sequence_classification(reward_model, padding):
    tokens = np.load(os.path.join(REWARD, "tokens.npy"))
    expected = np.load(os.path.join(REWARD, "scores.npy"))
    rows = {
        "none": (tokens != 0).all(axis=1),
        "right": tokens[:, -1] == 0,
        "left": tokens[:, 0] == 0,
    }[padding]
    assert isinstance(reward_model, LlamaRewardModel) and rows.any()
    assert reward_model.config.compute_dtype == "float32"  # the file's dtype
    np.testing.assert_allclose(_scores(reward_model, tokens)[rows], expected[rows], atol=1e-4, rtol=0)


def test_hf_export_is_a_single_label_sequence_classifier(tmp_path, reward_model, mesh):
    convert.export_model(reward_model, str(tmp_path / "hf"), "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["num_labels"] == 1 and hf_config["pad_token_id"] == 0
    ours = read_safetensors(tmp_path / "hf" / "model.safetensors")
    reference = read_safetensors(os.path.join(REWARD, "hf", "model.safetensors"))
    assert set(ours) == set(reference) and ours["score.weight"].shape == (1, 32)
    assert all(np.array_equal(ours[name].load(), reference[name].load()) for name in reference)
    reloaded = load_pretrained(tmp_path / "hf", mesh=mesh)
    assert isinstance(reloaded, LlamaRewardModel)
    _assert_same_params(reward_model, reloaded)


def test_orbax_export_and_conversions_keep_the_kind(tmp_path, reward_model, mesh):
    convert.export_model(reward_model, str(tmp_path / "orbax"), "orbax")
    assert json.loads((tmp_path / "orbax" / "model_config.json").read_text())["kind"] == "reward"
    convert.convert(str(tmp_path / "orbax"), "orbax", str(tmp_path / "hf"), "hf")
    convert.convert(str(tmp_path / "hf"), "hf", str(tmp_path / "orbax2"), "orbax")
    assert json.loads((tmp_path / "orbax2" / "model_config.json").read_text())["kind"] == "reward"
    for path in ("orbax", "hf", "orbax2"):
        reloaded = load_pretrained(tmp_path / path, mesh=mesh)
        assert isinstance(reloaded, LlamaRewardModel), path
        _assert_same_params(reward_model, reloaded)


def test_training_workdirs_load_as_their_kind(tmp_path, reward_model, mesh):
    lm = load_pretrained(os.path.join(FIXTURES, "gqa", "hf"), mesh=mesh)
    for model, kind, cls in ((reward_model, "reward", LlamaRewardModel), (lm, "llama", Llama)):
        workdir = tmp_path / kind
        write_run_files(str(workdir), {}, model.config.to_dict(), None, kind)
        checkpointer = ocp.StandardCheckpointer()
        state = {"step": 3, "params": nest(model_arrays(model)), "opt_state": {}}
        checkpointer.save(workdir / "checkpoints" / "3" / "state", state)
        checkpointer.wait_until_finished()
        loaded = load_pretrained(workdir, mesh=mesh)
        assert type(loaded) is cls
        _assert_same_params(model, loaded)


def test_a_kind_that_does_not_match_the_saved_tree_is_named(tmp_path, reward_model, mesh):
    convert.export_model(reward_model, str(tmp_path / "orbax"), "orbax")
    config_file = tmp_path / "orbax" / "model_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "kind": "llama"}))
    missing = r"\['output.kernel'\] of a llama model are missing .*\['score.kernel'\]"
    with pytest.raises(ValueError, match=missing):
        load_pretrained(tmp_path / "orbax", mesh=mesh)
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "kind": "critic"}))
    with pytest.raises(ValueError, match="unknown model kind 'critic'"):
        load_pretrained(tmp_path / "orbax", mesh=mesh)


def test_meta_refuses_a_reward_model_and_names_the_alternatives(tmp_path, reward_model):
    with pytest.raises(ValueError, match="export it as hf .* or orbax"):
        convert.export_model(reward_model, str(tmp_path / "meta"), "meta")
    with pytest.raises(ValueError, match="export it as hf .* or orbax"):
        convert.convert(os.path.join(REWARD, "hf"), "hf", str(tmp_path / "meta2"), "meta")
    assert not (tmp_path / "meta").exists() and not (tmp_path / "meta2").exists()


def _edited_reward_fixture(tmp_path, **changes):
    checkpoint = tmp_path / "hf"
    shutil.copytree(os.path.join(REWARD, "hf"), checkpoint)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            hf_config.pop(key)
        else:
            hf_config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(hf_config))
    return checkpoint


def test_without_architectures_the_head_tensor_tells_the_kind(tmp_path):
    _, tensors = read_checkpoint(_edited_reward_fixture(tmp_path, architectures=None))
    assert layout.kind_of(tensors) == "reward"


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            (
                r"a LlamaForCausalLM needs the head tensor lm_head.weight, "
                r"but the checkpoint holds \['score.weight'\]"
            ),
        ),
        ({"architectures": ["LlamaForTokenClassification"]}, "architectures .* are not supported"),
        ({"id2label": {"0": "bad", "1": "good"}}, "with 2 labels; only a single-score reward model"),
    ],
)
def test_hf_heads_that_do_not_fit_are_one_clear_error(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        read_checkpoint(_edited_reward_fixture(tmp_path, **changes))


def test_against_transformers_sequence_classification_directly(tmp_path, reward_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert.export_model(reward_model, str(tmp_path / "hf"), "hf", max_shard_bytes=30_000)
    reference = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokens = np.load(os.path.join(REWARD, "tokens.npy"))
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(tokens != 0).long()
        ).logits[:, 0].numpy()
    np.testing.assert_allclose(_scores(reward_model, tokens), expected, atol=1e-4, rtol=0)


def test_checkpoint_config_tells_config_and_kind_without_the_weights(tmp_path, reward_model):
    convert.export_model(reward_model, str(tmp_path / "orbax"), "orbax")
    for path, kind in (
        (os.path.join(REWARD, "hf"), "reward"),
        (str(tmp_path / "orbax"), "reward"),
        (os.path.join(FIXTURES, "gqa", "meta"), "llama"),
        (os.path.join(FIXTURES, "gqa", "hf"), "llama"),
    ):
        config, found = checkpoint_config(path)
        assert found == kind, path
        assert (config.dim, config.n_kv_heads, config.vocab_size) == (32, 2, 128), path


def test_a_language_model_loads_as_a_reward_model_with_a_new_score_head(mesh):
    language_model = load_pretrained(os.path.join(FIXTURES, "gqa", "hf"), mesh=mesh)
    reward_model = load_pretrained(os.path.join(FIXTURES, "gqa", "hf"), mesh=mesh, kind="reward", seed=3)
    assert isinstance(reward_model, LlamaRewardModel)
    backbone, with_head = model_arrays(language_model), model_arrays(reward_model)
    assert set(backbone) - set(with_head) == {"output.kernel"} and set(with_head) - set(backbone) == {"score.kernel"}
    for key in set(backbone) & set(with_head):
        assert np.array_equal(np.asarray(with_head[key]), np.asarray(backbone[key])), key
        assert with_head[key].sharding == backbone[key].sharding, key
    # The head a new reward model of that shape would start with, from the same seed, laid out by the rules.
    fresh = LlamaRewardModel(reward_model.config, rngs=nnx.Rngs(3))
    assert_close_at_scale(np.asarray(with_head["score.kernel"]), np.asarray(fresh.score.kernel[...]), rtol=1e-6)
    assert with_head["score.kernel"].sharding.spec == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="holds a reward model, which has no next-token head"):
        load_pretrained(os.path.join(REWARD, "hf"), mesh=mesh, kind="llama")
