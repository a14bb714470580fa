"""A user's own data: every record shape people have, in JSONL and Parquet, read alike; a bad record
shown a good one; local files held out for evaluation; nothing mixed into them unasked."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.dpo import get_config as dpo_config
from configs.reward import get_config as reward_config
from llama2_jax.config_cli import parse_config_flags
from llama2_jax.data import DataError, Tokenizer, default_data_config, open_split, sources
from llama2_jax.data.records import (CHAT_EXAMPLE, parse_chat_record, parse_preference_record, parse_prompt_record,
                                     parse_records)
from llama2_jax.stages import preference_pairs

HI, HELLO, WHAT = "Hi", "Hello! How can I help?", "What?"
USER, ANSWER, OTHER = ({"role": "user", "content": HI}, {"role": "assistant", "content": HELLO},
                       {"role": "assistant", "content": WHAT})

CHAT_SHAPES = {
    "messages": {"messages": [USER, ANSWER]},
    "sharegpt": {"conversations": [{"from": "human", "value": HI}, {"from": "gpt", "value": HELLO}]},
    "trl_strings": {"prompt": HI, "completion": HELLO},
    "trl_messages": {"prompt": [USER], "completion": [ANSWER]},
}
PREFERENCE_SHAPES = {
    "strings": {"prompt": HI, "chosen": HELLO, "rejected": WHAT},
    "trl_explicit_prompt": {"prompt": [USER], "chosen": [ANSWER], "rejected": [OTHER]},
    "ultrafeedback": {"prompt": HI, "prompt_id": "0f3a", "chosen": [USER, ANSWER], "rejected": [USER, OTHER],
                      "messages": [USER, ANSWER], "score_chosen": 8.5, "score_rejected": 3.0},
    "trl_implicit_prompt": {"chosen": [USER, ANSWER], "rejected": [USER, OTHER]},
    "anthropic_hh": {"chosen": f"\n\nHuman: {HI}\n\nAssistant: {HELLO}",
                     "rejected": f"\n\nHuman: {HI}\n\nAssistant: {WHAT}"},
}
PROMPT_SHAPES = {
    "string": {"prompt": HI},
    "messages_prompt": {"prompt": [USER]},
    "dialog": {"messages": [USER, ANSWER]},
    "sharegpt": {"conversations": [{"from": "human", "value": HI}, {"from": "gpt", "value": HELLO}]},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def parsed(path, parse):
    return [example for _, example in parse_records([path], parse)]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet], ids=["jsonl", "parquet"])
@pytest.mark.parametrize("shapes, parse, expected", [
    (CHAT_SHAPES, parse_chat_record, {"messages": [dict(USER, train=True), dict(ANSWER, train=True)]}),
    (PREFERENCE_SHAPES, parse_preference_record, {"prompt": [USER], "chosen": HELLO, "rejected": WHAT, "rating": -1,
                                                  "chosen_safe": -1, "rejected_safe": -1}),
    (PROMPT_SHAPES, parse_prompt_record, {"prompt": [USER], "safety": 0}),
], ids=["chat", "preferences", "prompts"])
def test_every_shape_of_a_record_kind_parses_to_the_same_example(tmp_path, write, shapes, parse, expected):
    suffix = ".jsonl" if write is write_jsonl else ".parquet"
    for name, record in shapes.items():
        assert parsed(write(tmp_path / f"{name}{suffix}", [record]), parse) == [expected], name


def test_a_trl_prompt_completion_dialog_trains_on_the_completion_alone():
    record = {"prompt": [{"role": "system", "content": "Be brief."}, USER, ANSWER, {"role": "user", "content": "And?"}],
              "completion": [{"role": "assistant", "content": "That is all."}]}
    messages = parse_chat_record(record)["messages"]
    assert [(message["role"], message["train"]) for message in messages] == [
        ("system", True), ("user", True), ("assistant", False), ("user", True), ("assistant", True)]


def test_answers_given_as_conversations_repeat_their_prompt_or_are_refused():
    multi_turn = [USER, ANSWER, {"role": "user", "content": "And?"}]
    yes, no = {"role": "assistant", "content": "Yes."}, {"role": "assistant", "content": "No."}
    pair = parse_preference_record({"prompt": multi_turn, "chosen": [*multi_turn, yes], "rejected": [no],
                                    "rating": "better"})
    assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["rating"]) == (multi_turn, "Yes.", "No.", 1)
    with pytest.raises(DataError, match="'chosen' holds turns before its answer that are not the prompt's"):
        parse_preference_record({"prompt": "Bye", "chosen": [USER, ANSWER], "rejected": WHAT})


def test_an_hh_transcript_of_several_turns_is_its_history_and_last_answers():
    history = "\n\nHuman: Help?\n\nAssistant: Sure.\n\nHuman: Thanks"
    pair = parse_preference_record({"chosen": f"{history}\n\nAssistant: Welcome!",
                                    "rejected": f"{history}\n\nAssistant: Whatever."})
    assert [message["content"] for message in pair["prompt"]] == ["Help?", "Sure.", "Thanks"]
    assert (pair["chosen"], pair["rejected"]) == ("Welcome!", "Whatever.")
    with pytest.raises(DataError, match="differ before their last answer"):
        parse_preference_record({"chosen": f"{history}\n\nAssistant: A.", "rejected": "\n\nHuman: Hi\n\nAssistant: B."})


@pytest.mark.parametrize("write, suffix", [(write_jsonl, ".jsonl"), (write_parquet, ".parquet")])
def test_a_bad_record_is_one_line_naming_file_and_line_with_a_valid_record(tmp_path, write, suffix):
    path = write(tmp_path / f"chat{suffix}", [{"messages": [USER, ANSWER]}, {"messages": [USER]}])
    with pytest.raises(DataError) as error:
        parsed(path, parse_chat_record)
    message = str(error.value)
    assert message.startswith(f"{path}:2: a training dialog must end with an assistant answer")
    assert message.endswith(f"; expected a record like {json.dumps(CHAT_EXAMPLE)}") and "\n" not in message


def test_bad_pairs_and_prompts_are_shown_a_valid_one(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": HI, "chosen": HELLO}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field 'rejected'.*expected a record like "
                                        r'\{"prompt": "Hi", "chosen": ".*", "rejected": ".*"\}$'):
        parsed(pairs, parse_preference_record)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": HI}])
    with pytest.raises(DataError, match=r'prompts.jsonl:1: no .prompt.*expected a record like \{"prompt": "Hi"\}$'):
        parsed(prompts, parse_prompt_record)


def test_parquet_text_files_and_unreadable_parquet(tmp_path):
    texts = write_parquet(tmp_path / "texts.parquet", [{"body": "first"}, {"body": "second"}])
    for format in ("text", "jsonl"):
        builder = sources.build_local_dataset(f"parquet_{format}", [texts], format=format, text_field="body",
                                              data_dir=tmp_path / "tfds")
        source = sources.data_source(builder, "train")
        assert sorted(source[index]["text"] for index in range(len(source))) == [b"first", b"second"]
    with pytest.raises(DataError, match=r'texts.parquet:1: missing field \'text\'.*expected a record like \{"text"'):
        sources.build_local_dataset("wrong_field", [texts], format="jsonl", data_dir=tmp_path / "tfds")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a Parquet file"):
        sources.build_local_dataset("broken", [tmp_path / "broken.parquet"], format="chat", data_dir=tmp_path / "tfds")
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="empty.parquet: file is empty"):
        sources.build_local_dataset("empty", [empty], format="chat", data_dir=tmp_path / "tfds")


def local_data(tmp_path, count, **settings):
    path = write_jsonl(tmp_path / "dialogs.jsonl", [{"messages": [dict(USER, content=f"Hi {index}"), ANSWER]}
                                                     for index in range(count)])
    config = default_data_config()
    config.update({"dataset": "my_dialogs", "paths": (str(path),), "format": "chat",
                   "data_dir": str(tmp_path / "tfds"), **settings})
    return config


@pytest.mark.parametrize("count, held_out", [(3, 1), (60, 3)])
def test_local_files_hold_out_a_validation_split_by_default_and_say_so_once(tmp_path, capsys, count, held_out):
    config = local_data(tmp_path, count)
    train, validation = open_split(config, "train", kind="chat"), open_split(config, "validation", kind="chat")
    assert (len(train), len(validation)) == (count - held_out, held_out)
    told = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held out")]
    assert told == [f"held out {held_out} of the {count} examples of data.paths as the validation split "
                    "(data.holdout_fraction 0.05, at least one; 0 holds out none)"]


def test_the_bundled_corpus_holds_out_what_it_always_has(tmp_path):
    splits = sources.bundled_dataset("shakespeare", tmp_path).info.splits
    assert (splits["train"].num_examples, splits["validation"].num_examples) == (321, 15)


def test_a_missing_evaluation_split_is_one_error_naming_the_fix_before_any_build(tmp_path):
    config = local_data(tmp_path, 5, holdout_fraction=0.0)
    with pytest.raises(DataError, match=r"no split 'validation' \(it has train\), which evaluations read.*"
                                        r"data.holdout_fraction.*train.eval_every=0"):
        open_split(config, "validation", kind="chat")
    assert not (tmp_path / "tfds").exists()
    assert len(open_split(config, "train", kind="chat")) == 5
    prepared = local_data(tmp_path, 5, holdout_fraction=0.0, paths=())
    with pytest.raises(DataError, match=r"no split 'validation'.*--holdout-fraction.*train.eval_every=0"):
        open_split(prepared, "validation", kind="chat")


def test_a_local_dataset_built_with_another_holdout_is_built_again(tmp_path, capsys):
    config = local_data(tmp_path, 20, holdout_fraction=0.0)
    assert len(open_split(config, "train", kind="chat")) == 20
    config.holdout_fraction = 0.05
    assert len(open_split(config, "validation", kind="chat")) == 1
    assert "options of dataset local_chat/my_dialogs changed since it was built" in capsys.readouterr().out


@pytest.mark.parametrize("config, expected", [
    (reward_config("tiny"), [("shakespeare_helpfulness", 0.5), ("shakespeare_safety", 0.5)]),
    (reward_config("tiny,safety"), [("shakespeare_safety", 0.9), ("shakespeare_helpfulness", 0.1)]),
    (dpo_config("tiny"), [("shakespeare_helpfulness", 0.5), ("shakespeare_safety", 0.5)]),
    (reward_config("7b"), [("meta_helpfulness", 0.5), ("meta_safety", 0.25), ("open_helpfulness", 0.125),
                           ("anthropic_harmless", 0.125)]),
    (dpo_config("70b"), [("meta_helpfulness", 0.5), ("meta_safety", 0.25), ("open_helpfulness", 0.125),
                         ("anthropic_harmless", 0.125)]),
], ids=["reward_tiny", "reward_tiny_safety", "dpo_tiny", "reward_7b", "dpo_70b"])
def test_the_bundled_and_paper_data_keep_their_companions_and_files_of_your_own_get_none(config, expected):
    names, shares = preference_pairs.mixture(config)
    assert names == [name for name, _ in expected] and shares == pytest.approx([share for _, share in expected])
    for change in ({"paths": ("mine.jsonl",)}, {"dataset": "my_pairs"}):
        own = config.copy_and_resolve_references()
        own.data.update(change)
        assert preference_pairs.mixture(own) == ([own.data.dataset], [1.0])
        assert "nothing is mixed into" in preference_pairs.mixture_line(own)
    alone = config.copy_and_resolve_references()
    alone[config.stage].mix = ()
    assert preference_pairs.mixture(alone) == ([config.data.dataset], [1.0])


def test_a_mix_named_on_the_command_line_is_drawn_in_with_your_files(tmp_path, capsys):
    pairs = [{"prompt": f"Say {word}.", "chosen": f"{word}.", "rejected": "No."} for word in ("yes", "so", "ay", "aye")]
    mine = write_jsonl(tmp_path / "mine.jsonl", pairs)
    sources.build_local_dataset("other_pairs", [write_jsonl(tmp_path / "other.jsonl", pairs)], format="preferences",
                                data_dir=tmp_path / "tfds")
    flags = ["--config=configs/reward.py:tiny", f"--config.data.paths={mine}", "--config.data.format=preferences",
             "--config.data.dataset=mine", f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.eval_every=0"]
    config, _ = parse_config_flags(flags)
    preference_pairs.count_pairs(config, Tokenizer())
    assert ("training mix: mine 1 (reward.mix None: nothing is mixed into data.paths; reward.mix=((name, share), ...) "
            "names datasets to mix in)") in capsys.readouterr().out.splitlines()
    config, _ = parse_config_flags([*flags, "--config.reward.mix=(('other_pairs', 0.25),)"])
    assert [found.name for found in preference_pairs.count_pairs(config, Tokenizer())] == ["mine", "other_pairs"]
    assert "training mix: mine 0.75, other_pairs 0.25 (reward.mix as set)" in capsys.readouterr().out
    config, _ = parse_config_flags([*flags, "--config.reward.mix=(('never_built', 0.25),)"])
    with pytest.raises(DataError, match="reward.mix mixes in never_built, and dataset 'never_built' is not prepared"):
        preference_pairs.count_pairs(config, Tokenizer())
