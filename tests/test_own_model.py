"""A model of one's own: the checkpoint a stage starts from says what the model is.

A Llama-architecture model that is not shaped like Llama 2 (another RoPE base, norm epsilon,
vocabulary and context, grouped-query attention) goes through SFT and then DPO at learning rate 0
with no model key on the command line, from Hugging Face and from Meta files; the run's own record
and its Hugging Face export keep every setting of the source, and the exported model computes the
source's logits. A model key that contradicts the checkpoint, and a checkpoint without a
SentencePiece tokenizer, are one line each.
"""

import json

import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.checkpoint.convert import export_model
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from llama2_jax.model.config import ARCHITECTURE_FIELDS, LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.sharding import model_arrays

# Nothing here is a preset's value: the stages must read every one of them from the checkpoint.
OWN = LlamaConfig(vocab_size=4160, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, norm_eps=1e-6,
                  rope_theta=500000.0, max_seq_len=512, compute_dtype="float32")
TOKENS = np.array([[1, 417, 93, 2048, 7, 3301, 12, 600, 88, 4001, 5, 270, 31, 999, 64, 2]], np.int32)
TOKENIZER = Tokenizer()


def _dialogs(path):
    lines = [{"messages": [{"role": "user", "content": f"Who speaks line {index}?"},
                           {"role": "assistant", "content": "HAMLET, in the graveyard."}]} for index in range(24)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _pairs(path):
    lines = [{"prompt": f"Finish line {index}: To be, or not to be", "chosen": "that is the question.",
              "rejected": "whatever."} for index in range(24)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The same random model written as Hugging Face and as Meta files, each with its tokenizer.model."""
    root = tmp_path_factory.mktemp("own")
    model = Llama(OWN, rngs=nnx.Rngs(7))
    for format in ("hf", "meta"):
        export_model(model, str(root / format), format, tokenizer_path=str(BUNDLED_TOKENIZER))
    return root, np.asarray(model(TOKENS))


def _stage(command, config, init, workdir, data, tmp_path, *extra):
    return cli.main([command, f"--config=configs/{config}.py:tiny", f"--config.init_checkpoint={init}",
                     f"--workdir={workdir}", "--config.optimizer.peak_lr=0", "--config.train.steps=1",
                     "--config.train.eval_every=0", "--config.train.global_batch_size=8",
                     "--config.train.seq_len=64", f"--config.data.dataset=own_{command}",
                     f"--config.data.paths={data}", f"--config.data.data_dir={tmp_path / 'tfds'}", *extra])


@pytest.mark.parametrize("format", ["hf", "meta"])
def test_sft_then_dpo_keep_the_source_model_and_its_export_computes_its_logits(source, format, tmp_path):
    root, source_logits = source
    checkpoint = root / format
    saved = load_pretrained(checkpoint).config
    assert _stage("sft", "sft", checkpoint, tmp_path / "sft", _dialogs(tmp_path / "dialogs.jsonl"), tmp_path,
                  "--config.data.format=chat", "--config.sft.eval_prompts=0") == 0
    assert _stage("dpo", "dpo", tmp_path / "sft", tmp_path / "dpo", _pairs(tmp_path / "pairs.jsonl"), tmp_path,
                  "--config.data.format=preferences", "--config.dpo.mix=()") == 0
    for run in ("sft", "dpo"):
        recorded = json.loads((tmp_path / run / "model_config.json").read_text())
        assert {field: recorded[field] for field in ARCHITECTURE_FIELDS} == \
            {field: getattr(saved, field) for field in ARCHITECTURE_FIELDS}, run
    export = tmp_path / "export"
    assert cli.main(["convert", "--from=orbax", "--to=hf", str(tmp_path / "dpo"), str(export)]) == 0
    hf_config = json.loads((export / "config.json").read_text())
    assert (hf_config["rope_theta"], hf_config["rms_norm_eps"], hf_config["num_key_value_heads"],
            hf_config["vocab_size"], hf_config["max_position_embeddings"]) == \
        (500000.0, 1e-6, 2, 4160, 512 if format == "hf" else 4096)  # params.json records no context
    exported = load_pretrained(export)
    # Learning rate 0: the weights went through both runs untouched.
    for name, array in model_arrays(exported).items():
        np.testing.assert_array_equal(array, model_arrays(load_pretrained(checkpoint))[name], err_msg=name)
    # Separately compiled programs: float32 logits of order 1 agree to 1e-5.
    np.testing.assert_allclose(np.asarray(exported(TOKENS)), source_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("format", ["hf", "meta"])
def test_transformers_computes_the_source_logits_from_the_export(source, format, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, source_logits = source
    assert _stage("sft", "sft", root / format, tmp_path / "sft", _dialogs(tmp_path / "dialogs.jsonl"), tmp_path,
                  "--config.data.format=chat", "--config.sft.eval_prompts=0") == 0
    export = tmp_path / "export"
    assert cli.main(["convert", "--from=orbax", "--to=hf", str(tmp_path / "sft"), str(export)]) == 0

    def logits(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()

    # Separately computed float32 logits of order 1: 1e-5.
    from_export = logits(export)
    np.testing.assert_allclose(from_export, source_logits, atol=1e-5, rtol=0)
    if format == "hf":  # transformers reads the source itself too
        np.testing.assert_allclose(from_export, logits(root / "hf"), atol=1e-5, rtol=0)


def test_a_model_key_that_contradicts_the_checkpoint_or_a_missing_tokenizer_is_one_line(source, tmp_path, capsys):
    root, _ = source
    dialogs = _dialogs(tmp_path / "dialogs.jsonl")

    def error_of(init, *extra):
        code = _stage("sft", "sft", init, tmp_path / "sft", dialogs, tmp_path, "--config.data.format=chat", *extra)
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return code, error

    code, error = error_of(root / "hf", "--config.model.rope_theta=10000", "--config.model.n_kv_heads=4")
    assert code == 2 and error == (f"error: the checkpoint says what the model is: model.n_kv_heads=4 but {root / 'hf'} "
                                   f"has 2; model.rope_theta=10000.0 but {root / 'hf'} has 500000.0; leave those "
                                   "model keys unset\n")
    # A Hugging Face directory with only the `tokenizers` library's file.
    fast_only = tmp_path / "fast_only"
    fast_only.mkdir()
    for item in (root / "hf").iterdir():
        if item.name != "tokenizer.model":
            (fast_only / item.name).write_bytes(item.read_bytes())
    (fast_only / "tokenizer.json").write_text("{}")
    code, error = error_of(fast_only)
    assert code == 1 and f"{fast_only} has tokenizer.json but no tokenizer.model" in error
    assert "--config.data.tokenizer_path" in error
    assert not (tmp_path / "sft").exists()


def test_a_shorter_context_trains_at_fewer_positions_and_keeps_the_checkpoints(source, tmp_path):
    root, _ = source
    assert _stage("sft", "sft", root / "hf", tmp_path / "sft", _dialogs(tmp_path / "dialogs.jsonl"), tmp_path,
                  "--config.data.format=chat", "--config.sft.eval_prompts=0", "--config.model.max_seq_len=64") == 0
    assert json.loads((tmp_path / "sft" / "model_config.json").read_text())["max_seq_len"] == 512


def test_ids_a_tokenizer_does_not_have_are_one_clear_error():
    with pytest.raises(ValueError, match="token id 31000 is outside the 4096 pieces of the tokenizer .* use that "
                                         "model's own tokenizer"):
        TOKENIZER.decode([1, 55, 31000])
