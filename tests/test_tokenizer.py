"""Tokenizer: Llama 2 conventions, digit splitting, exact Unicode round trips, training recipe, CLI."""

import pytest

from llama2_jax.commands import tokenizer as tokenizer_module
from llama2_jax.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

ROUND_TRIP_TEXTS = [
    "",
    "plain words",
    "  leading spaces, double  spaces and trailing ",
    "line one\nline two\r\n\ttabbed\n\n",
    "emoji 😀🦙👩‍👩‍👧 and flags 🇫🇷",
    "CJK 漢字かなカナ 한국어, Arabic مرحبا, Devanagari नमस्ते",
    "control \x00\x01\x07\x1b[0m\x7f\u200b\ufeff characters",
    "the whitespace symbol \u2581 itself, \u2581\u2581 twice, and at the end\u2581",
    "\u2581 first",
    "digits 0123456789 and 3.14159",
]


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return Tokenizer()


def test_bundled_tokenizer_follows_llama2_ids(bundled):
    assert (bundled.vocab_size, bundled.bos_id, bundled.eos_id, bundled.unk_id) == (4096, 1, 2, 0)
    ids = bundled.encode("To be, or not to be", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert bundled.encode("To be, or not to be", bos=False) == ids[1:-1]
    assert bundled.decode(ids) == "To be, or not to be"


def test_digits_are_single_tokens(bundled):
    ids = bundled.encode("year 1604 and 98765", bos=False)
    digit_tokens = [bundled.decode([token]).strip() for token in ids]
    assert [piece for piece in digit_tokens if piece.isdigit()] == list("1604") + list("98765")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_unicode_round_trips_exactly(bundled, text):
    assert bundled.decode(bundled.encode(text, bos=True, eos=True)) == text


def test_batch_encoding_matches_single(bundled):
    assert bundled.encode_batch(ROUND_TRIP_TEXTS, eos=True) == [
        bundled.encode(text, eos=True) for text in ROUND_TRIP_TEXTS]


def test_train_from_files_and_texts(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog 12345.\n" * 200)
    (corpus / "b.txt").write_text("Pack my box with five dozen liquor jugs 67890!\n" * 200)
    from_files = train_tokenizer([corpus], tmp_path / "files", vocab_size=300)
    from_texts = train_tokenizer(["Sphinx of black quartz, judge my vow 2024."] * 300, tmp_path / "texts",
                                 vocab_size=300, from_files=False)
    for trained in (from_files, from_texts):
        assert (trained.vocab_size, trained.bos_id, trained.eos_id) == (300, 1, 2)
        for text in ROUND_TRIP_TEXTS:
            assert trained.decode(trained.encode(text)) == text
        assert len(trained.encode("2024", bos=False)) == 5  # dummy-prefix space + four digits


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer([tmp_path / "nowhere"], tmp_path / "out", vocab_size=300)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "out", vocab_size=300)


def test_cli_train_encode_decode(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world, hello tokenizer 42\n" * 300)
    prefix = tmp_path / "cli"
    assert tokenizer_module.main(["train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "280",
                                  "--out", str(prefix)]) == 0
    assert (tmp_path / "cli.model").is_file()
    assert tokenizer_module.main(["encode", "--model", f"{prefix}.model", "hello", "42"]) == 0
    ids = capsys.readouterr().out.splitlines()[-2].split()
    assert tokenizer_module.main(["decode", "--model", f"{prefix}.model", *ids]) == 0
    assert capsys.readouterr().out == "hello 42\n"
