"""tfds builders for local files and the bundled corpus, and one clear error per kind of bad input."""

import json

import pytest

from llama2_jax.data import RATING_LEVELS, DataError
from llama2_jax.commands import data as data_command
from llama2_jax.data import sources


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def examples(builder, split="train"):
    source = sources.data_source(builder, split)
    return [source[index] for index in range(len(source))]


def test_bundled_corpus_has_train_and_held_out_validation(tmp_path):
    builder = sources.bundled_dataset("shakespeare", tmp_path)
    train, validation = (builder.info.splits[name].num_examples for name in ("train", "validation"))
    assert train > 300 and 0 < validation < train / 10
    assert sources.prepared_dataset("shakespeare", tmp_path).info.splits["train"].num_examples == train


def test_text_files_one_document_each_or_cut_at_blank_lines(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    (corpus / "a.txt").write_text("first document")
    (corpus / "nested" / "b.txt").write_text("para one\n\npara two\n\npara three")
    whole = sources.build_local_dataset("whole", [corpus], data_dir=tmp_path / "tfds")
    assert sorted(example["text"] for example in examples(whole)) == [
        b"first document", b"para one\n\npara two\n\npara three"]
    cut = sources.build_local_dataset("cut", [corpus], data_dir=tmp_path / "tfds", document_chars=5)
    assert sorted(example["text"] for example in examples(cut)) == [
        b"first document", b"para one\n\n", b"para three", b"para two\n\n"]
    # Prepared datasets open by name in a later run.
    assert sources.prepared_dataset("local_text/cut", tmp_path / "tfds").info.splits["train"].num_examples == 4


def test_jsonl_text_field_and_bad_lines(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"body": "one"}, "{broken", {"body": "two"}, {"other": 1}])
    with pytest.raises(DataError, match=r"docs.jsonl:2: malformed JSON line"):
        sources.build_local_dataset("bad", [data], format="jsonl", text_field="body", data_dir=tmp_path)
    skipped = sources.build_local_dataset("skip", [data], format="jsonl", text_field="body", data_dir=tmp_path,
                                          skip_bad_lines=True)
    assert [example["text"] for example in examples(skipped)] == [b"one", b"two"]
    assert skipped.info.metadata["skipped_lines"] == 2
    with pytest.raises(DataError, match=r"docs.jsonl:1: missing field 'text'.*data.text_field"):
        sources.build_local_dataset("field", [data], format="jsonl", data_dir=tmp_path, skip_bad_lines=False)


def test_chat_dialogs_in_both_shapes(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ])
    dialogs = sorted(examples(sources.build_local_dataset("chat", [data], format="chat", data_dir=tmp_path)),
                     key=lambda dialog: -len(dialog["messages"]["role"]))  # tfds stores examples shuffled
    assert [list(dialog["messages"]["role"]) for dialog in dialogs] == [
        [b"system", b"user", b"assistant"], [b"user", b"assistant"]]
    assert list(dialogs[1]["messages"]["content"]) == [b"2+2?", b"4"]
    bad = write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(DataError, match=r"bad_chat.jsonl:1: unknown role 'narrator'"):
        sources.build_local_dataset("bad_chat", [bad], format="chat", data_dir=tmp_path)


def test_preference_pairs_ratings_safety_and_hh_shape(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "rating": "significantly better",
         "chosen_safe": True, "rejected_safe": False},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "What."},
        {"chosen": "\n\nHuman: Help?\n\nAssistant: Sure.\n\nHuman: Thanks\n\nAssistant: Welcome!",
         "rejected": "\n\nHuman: Help?\n\nAssistant: Sure.\n\nHuman: Thanks\n\nAssistant: Whatever.",
         "rating": "unsure"},
    ])
    pairs = sorted(examples(sources.build_local_dataset("prefs", [data], format="preferences", data_dir=tmp_path)),
                   key=lambda pair: pair["chosen"])  # tfds stores examples shuffled
    assert [int(pair["rating"]) for pair in pairs] == [0, -1, len(RATING_LEVELS) - 1]
    assert [(int(pair["chosen_safe"]), int(pair["rejected_safe"])) for pair in pairs] == [(1, 0), (-1, -1), (-1, -1)]
    assert list(pairs[2]["prompt"]["content"]) == [b"Help?", b"Sure.", b"Thanks"]
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == (b"Welcome!", b"Whatever.")
    bad = write_jsonl(tmp_path / "bad_rating.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                       "rating": "amazing"}])
    with pytest.raises(DataError, match=r"bad_rating.jsonl:1: rating 'amazing' is not one of the four levels"):
        sources.build_local_dataset("bad_rating", [bad], format="preferences", data_dir=tmp_path)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"missing.jsonl:1: missing field 'rejected'"):
        sources.build_local_dataset("missing", [missing], format="preferences", data_dir=tmp_path)


def test_missing_empty_and_unprepared_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        sources.build_local_dataset("none", [tmp_path / "absent.txt"], data_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        sources.build_local_dataset("empty", [tmp_path / "empty.txt"], data_dir=tmp_path)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(DataError, match="has no examples"):
        sources.build_local_dataset("blank", [blank], format="jsonl", data_dir=tmp_path, skip_bad_lines=True)
    with pytest.raises(DataError, match="not prepared"):
        sources.prepared_dataset("local_text/never_built", tmp_path)
    (tmp_path / "one.txt").write_text("one document")
    sources.build_local_dataset("reused", [tmp_path / "one.txt"], data_dir=tmp_path)
    (tmp_path / "two.txt").write_text("another document")
    with pytest.raises(DataError, match="was built from"):
        sources.build_local_dataset("reused", [tmp_path / "two.txt"], data_dir=tmp_path)
    with pytest.raises(DataError, match="no split 'validation'"):
        sources.data_source(sources.prepared_dataset("local_text/reused", tmp_path), "validation")


def test_data_cli_build_info_tokenize_by_bare_name(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Some text to build.\n\nAnd more text.")
    data_dir = str(tmp_path / "tfds")
    assert data_command.main(["--data-dir", data_dir, "build", "--name", "cli", "--input", str(tmp_path / "a.txt")]) == 0
    assert "--config.data.dataset=cli" in capsys.readouterr().out
    assert data_command.main(["--data-dir", data_dir, "info", "--dataset", "local_text/cli"]) == 0
    # As the README writes it: the bare name a local dataset was built under.
    assert data_command.main(["--data-dir", data_dir, "tokenize", "--dataset", "cli", "--seq-len", "16",
                              "--out", str(tmp_path / "tokens")]) == 0
    assert (tmp_path / "tokens" / "train.array_record").is_file()
    capsys.readouterr()
    assert data_command.main(["--data-dir", data_dir, "info", "--dataset", "missing"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: dataset 'missing' is not prepared") and error.count("\n") == 1
    assert "data build" in error and len(error) < 400  # not tfds's catalogue of every dataset


def test_a_dataset_of_another_kind_names_the_command_that_reads_it(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "hello"}]}])
    builder = sources.build_local_dataset("chats", [chats], format="chat", data_dir=tmp_path)
    with pytest.raises(DataError, match="holds chat data.*python -m llama2_jax sft"):
        sources.check_kind(builder, "text")
    sources.check_kind(builder, "chat")


@pytest.mark.parametrize("name, feature", [("shakespeare_dialogs", "messages"), ("shakespeare_helpfulness", "chosen"),
                                           ("shakespeare_safety", "chosen")])
def test_bundled_demo_datasets_build_with_held_out_splits(tmp_path, name, feature):
    builder = sources.prepared_dataset(name, tmp_path)
    assert feature in builder.info.features
    train, validation = (builder.info.splits[split].num_examples for split in ("train", "validation"))
    assert train > 1000 and 100 < validation < train / 4


def test_a_local_dataset_whose_files_changed_is_built_again(tmp_path, capsys):
    corpus = tmp_path / "doc.txt"
    corpus.write_text("first version")
    assert [e["text"] for e in examples(sources.build_local_dataset("changing", [corpus], data_dir=tmp_path))] == [
        b"first version"]
    corpus.write_text("second, longer version")
    rebuilt = sources.build_local_dataset("changing", [corpus], data_dir=tmp_path)
    assert [e["text"] for e in examples(rebuilt)] == [b"second, longer version"]
    assert "changed since it was built" in capsys.readouterr().out


def test_building_and_reading_a_local_dataset_prints_one_line_and_keeps_real_warnings(tmp_path, capsys, caplog):
    from absl import logging as absl_logging

    (tmp_path / "doc.txt").write_text("a document")
    for _ in range(2):  # the build, then a read of what it built
        sources.build_local_dataset("quiet", [tmp_path / "doc.txt"], data_dir=tmp_path / "tfds")
    absl_logging.warning("a warning the user can act on")
    output = capsys.readouterr()
    assert output.out.splitlines() == [f"building dataset local_text/quiet in {tmp_path / 'tfds'}"]
    assert [record.getMessage() for record in caplog.records if record.name == "absl"] == [
        "a warning the user can act on"]
