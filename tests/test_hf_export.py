"""The Hugging Face export is what transformers expects: beside the weights, the tokenizer files and
generation defaults with which transformers tokenizes, formats dialogs and generates as we do.

The first tests read the files as JSON and run everywhere; the last load an export with transformers
itself where it is installed (AutoTokenizer, apply_chat_template; AutoModelForCausalLM.generate
also needs PyTorch).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm

from llama2_jax import cli, sharding
from llama2_jax.checkpoint import convert, hf_tokenizer
from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from llama2_jax.generate import generate
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import LlamaRewardModel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
JSON_FILES = (
    hf_tokenizer.TOKENIZER_CONFIG_FILE,
    hf_tokenizer.SPECIAL_TOKENS_FILE,
    hf_tokenizer.GENERATION_CONFIG_FILE,
)
TEXTS = [
    "",
    "ROMEO: But soft, what light through yonder window breaks?",
    "  two leading spaces",
    " one leading space and a trailing one ",
    "line one\nline two\n\n\tand a tab",
    "\nstarts with a newline",
    "naïve café — 日本語 🙂",
    "12345 digits, each its own piece",
]
SYSTEM = {"role": "system", "content": "  Speak as a pirate.\nAlways.  "}
DIALOGS = [
    [{"role": "user", "content": "Who art thou?"}],
    [SYSTEM, {"role": "user", "content": "  Who art thou? \n"}],
    [{"role": "user", "content": "Hail!"}, {"role": "assistant", "content": " Well met.\n"}],
    [
        SYSTEM,
        {"role": "user", "content": "Hail!"},
        {"role": "assistant", "content": "Well met."},
        {"role": "user", "content": "Whither goest thou?"},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "Hail!"},
        {"role": "assistant", "content": "Well met."},
        {"role": "user", "content": "Whither goest thou?"},
        {"role": "assistant", "content": "To Verona — naïve 日本"},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "\nThree"},
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "Five"},
    ],
]
# In logits. Greedy tokens of two separately compiled programs (ours and PyTorch's) are compared
# exactly only where every step's winner leads the runner-up by far more than their float32 logits
# differ (~1e-5).
MARGIN = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(BUNDLED_TOKENIZER)


def read_json(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8") as file:
        return json.load(file)


def tiny_config(**overrides):
    return LlamaConfig.from_preset(
        "tiny", compute_dtype="float32", n_layers=2, max_seq_len=128, **overrides
    )


# ---- the files (no transformers needed) ----------------------------------------------------------


def test_convert_to_hf_writes_the_tokenizer_files_and_round_trips_keep_them(tmp_path, tokenizer):
    shutil.copytree(os.path.join(FIXTURES, "gqa", "meta"), tmp_path / "meta")
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "tokenizer.model")  # Meta's layout: beside the sizes
    command = ["convert", "--from", "meta", "--to", "hf", str(tmp_path / "meta"), str(tmp_path / "hf")]
    assert cli.main(command) == 0

    hf_config = read_json(tmp_path / "hf", "config.json")
    tokenizer_config = read_json(tmp_path / "hf", hf_tokenizer.TOKENIZER_CONFIG_FILE)
    # The bundled tokenizer's own pieces and ids, Llama 2's.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)
    assert [tokenizer.id_to_piece(token) for token in (1, 2, 0)] == ["<s>", "</s>", "<unk>"]
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    assert tokenizer_config == {
        **special_tokens,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hf_config["max_position_embeddings"],
        "padding_side": "left",
        "chat_template": hf_tokenizer.LLAMA2_CHAT_TEMPLATE,
    }
    assert read_json(tmp_path / "hf", hf_tokenizer.SPECIAL_TOKENS_FILE) == special_tokens
    assert read_json(tmp_path / "hf", hf_tokenizer.GENERATION_CONFIG_FILE) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "max_length": hf_config["max_position_embeddings"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 0,
    }

    # hf -> hf, and hf -> orbax -> hf (whose own files hold only the tokenizer.model): the same files.
    convert.convert(str(tmp_path / "hf"), "hf", str(tmp_path / "hf2"), "hf")
    convert.convert(str(tmp_path / "hf"), "hf", str(tmp_path / "orbax"), "orbax")
    assert not any((tmp_path / "orbax" / name).exists() for name in JSON_FILES)
    convert.convert(str(tmp_path / "orbax"), "orbax", str(tmp_path / "hf3"), "hf")
    for name in ("tokenizer.model", *JSON_FILES):
        original = (tmp_path / "hf" / name).read_bytes()
        assert (tmp_path / "hf2" / name).read_bytes() == original, name
        assert (tmp_path / "hf3" / name).read_bytes() == original, name


def test_export_model_writes_them_for_a_language_model_and_a_reward_model(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    language_model = sharding.create_model(tiny_config(), mesh)
    convert.export_model(language_model, str(tmp_path / "llama"), "hf", str(BUNDLED_TOKENIZER))
    assert all((tmp_path / "llama" / name).is_file() for name in JSON_FILES)
    assert read_json(tmp_path / "llama", hf_tokenizer.TOKENIZER_CONFIG_FILE)["model_max_length"] == 128
    assert read_json(tmp_path / "llama", hf_tokenizer.GENERATION_CONFIG_FILE)["max_length"] == 128

    reward_model = sharding.create_model(tiny_config(), mesh, model_class=LlamaRewardModel)
    convert.export_model(reward_model, str(tmp_path / "reward"), "hf", str(BUNDLED_TOKENIZER))
    assert (tmp_path / "reward" / hf_tokenizer.TOKENIZER_CONFIG_FILE).is_file()
    assert (tmp_path / "reward" / hf_tokenizer.SPECIAL_TOKENS_FILE).is_file()
    assert not (tmp_path / "reward" / hf_tokenizer.GENERATION_CONFIG_FILE).exists()  # it writes no text

    convert.export_model(language_model, str(tmp_path / "bare"), "hf")
    assert not any((tmp_path / "bare" / name).exists() for name in ("tokenizer.model", *JSON_FILES))


def test_a_tokenizer_without_bos_or_eos_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "no_bos"), vocab_size=40, model_type="bpe",
        unk_id=0, bos_id=-1, eos_id=2, minloglevel=2,
    )
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_model(tiny_config(vocab_size=64), mesh)
    with pytest.raises(ValueError, match=r"no BOS or EOS piece \(bos_id -1, eos_id 2\).*trained with both"):
        convert.export_model(model, str(tmp_path / "hf"), "hf", str(tmp_path / "no_bos.model"))


# ---- with transformers (only where installed) ---------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random language model and its hf export with the bundled tokenizer."""
    pytest.importorskip("transformers")
    model = sharding.create_model(tiny_config(), sharding.make_mesh(devices=jax.devices()[:1]), seed=3)
    path = tmp_path_factory.mktemp("hf_export")
    convert.export_model(model, str(path), "hf", str(BUNDLED_TOKENIZER))
    return model, path


@pytest.fixture(scope="module")
def hf_tokenizer_of_export(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported[1])


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_tokenizes_text_as_we_do(hf_tokenizer_of_export, tokenizer, text):
    assert hf_tokenizer_of_export(text).input_ids == tokenizer.encode(text, bos=True)


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_transformers_chat_template_encodes_dialogs_as_we_do(
    hf_tokenizer_of_export, tokenizer, dialog, add_generation_prompt
):
    ids = hf_tokenizer_of_export.apply_chat_template(
        dialog, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert list(ids) == encode_dialog(tokenizer, dialog).tokens


@pytest.mark.parametrize(
    "dialog, problem",
    [
        ([SYSTEM], "no user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1: expected role assistant, got user",
        ),
        (
            [{"role": "user", "content": "[INST] hi"}],
            r"message 0 \(user\) contains the reserved chat tag \[INST\]",
        ),
    ],
)
def test_transformers_chat_template_refuses_what_our_chat_format_refuses(
    hf_tokenizer_of_export, dialog, problem
):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=problem):
        hf_tokenizer_of_export.apply_chat_template(dialog, tokenize=False)


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_transformers_generates_what_we_generate(exported, hf_tokenizer_of_export, tokenizer, chat):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, path = exported
    new_tokens = 12
    if chat:
        dialog = DIALOGS[3]
        inputs = hf_tokenizer_of_export.apply_chat_template(
            dialog, return_tensors="pt", return_dict=True
        )
        prompt = encode_dialog(tokenizer, dialog).tokens
    else:
        text = "ROMEO: But soft, what light"
        inputs = hf_tokenizer_of_export(text, return_tensors="pt")
        prompt = tokenizer.encode(text, bos=True)
    assert inputs["input_ids"][0].tolist() == prompt

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        output = reference.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    top_two = np.sort(np.stack([logits[0].numpy() for logits in output.logits]), axis=-1)[:, -2:]
    margin = (top_two[:, 1] - top_two[:, 0]).min()
    assert margin >= MARGIN, "a greedy step is a near-tie: choose another prompt or seed"

    ours = generate(model, [prompt], max_new_tokens=new_tokens, eos_id=tokenizer.eos_id)
    assert output.sequences[0, len(prompt) :].tolist() == ours.token_lists()[0]
