"""Prompts, read one way by every command and stage that answers them: from a file, from a dataset of
prompts, and the bundled demo prompts for rejection sampling."""

import json

import pytest

from llama2_jax.data import sources
from llama2_jax.data.prompts import read_prompts, split_prompts
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.train.config import Schedule, base_config

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who speaks?"},
          {"role": "assistant", "content": "HAMLET."}, {"role": "user", "content": "Which play?"},
          {"role": "assistant", "content": "Hamlet."}]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_file_of_prompts_as_text_lines_or_json_lines(tmp_path):
    text = read_prompts(write_lines(tmp_path / "prompts.txt", ["To be, or not to be", "", "ROMEO:"]))
    assert [prompt.text for prompt in text] == ["To be, or not to be", "ROMEO:"]
    assert text[0].dialog() == [{"role": "user", "content": "To be, or not to be"}]
    records = [{"messages": DIALOG, "safety": True}, {"prompt": "Continue this speech:\nO, I am slain!"},
               {"prompt": DIALOG[1:4], "category": "violence"}]
    prompts = read_prompts(write_lines(tmp_path / "prompts.jsonl", [json.dumps(record) for record in records]))
    assert prompts[0].dialog() == DIALOG[:4] and prompts[0].safety and prompts[0].text is None
    assert prompts[1].text == "Continue this speech:\nO, I am slain!" and not prompts[1].safety
    assert prompts[2].dialog() == DIALOG[1:4] and prompts[2].category == "violence"
    tokenizer = Tokenizer()
    assert prompts[1].tokens(tokenizer) == tokenizer.encode(prompts[1].text, bos=True, eos=False)
    assert tokenizer.decode(prompts[0].tokens(tokenizer)).endswith("[INST] Which play? [/INST]")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "p.jsonl:2: message 0: expected role 'user'"),
    ('{"prompt": "hi", "safety": "yes"}', "p.jsonl:2: 'safety' must be true or false"),
    ('{"text": "hi"}', "p.jsonl:2: no 'prompt', 'messages' or 'conversations' field.*"
                       'expected a record like {"prompt": "Hi"}'),
    ("not json", "p.jsonl:2: Expecting value"),
])
def test_a_bad_prompt_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "fine"}', line])
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_a_dataset_of_prompts_keeps_each_dialog_up_to_its_last_user_turn_and_its_flag(tmp_path):
    records = [{"messages": DIALOG, "safety": True}, {"prompt": "Who speaks this line?\nOut, damned spot!"}]
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps(record) for record in records])
    config = base_config("rejection", "tiny", Schedule(peak_lr=1e-3, warmup_steps=1, steps=1, global_batch_size=8,
                                                       seq_len=64))
    config.data.update(dict(dataset="my_prompts", paths=(str(path),), format="prompts", data_dir=str(tmp_path),
                            holdout_fraction=0.0))
    prompts = sorted(split_prompts(config.data, "train"), key=lambda prompt: not prompt.safety)  # tfds's order
    assert [(prompt.dialog(), prompt.safety) for prompt in prompts] == [
        (DIALOG[:4], True), ([{"role": "user", "content": records[1]["prompt"]}], False)]
    with pytest.raises(DataError, match="holds prompts data.*python -m llama2_jax rejection"):
        sources.check_kind(sources.open_builder(config.data), "chat")


def test_the_bundled_demo_prompts_are_flagged_and_held_out(tmp_path):
    builder = sources.prepared_dataset("shakespeare_prompts", tmp_path)
    config = base_config("rejection", "tiny", Schedule(peak_lr=1e-3, warmup_steps=1, steps=1, global_batch_size=8,
                                                       seq_len=64))
    config.data.update(dict(dataset="shakespeare_prompts", data_dir=str(tmp_path)))
    train, held_out = split_prompts(config.data, "train"), split_prompts(config.data, "validation")
    assert builder.info.splits["train"].num_examples == len(train) == 1000 and len(held_out) == 200
    assert sum(prompt.safety for prompt in train) == 200 and sum(prompt.safety for prompt in held_out) == 100
    assert all(prompt.dialog()[-1]["content"].startswith("Continue this speech:") for prompt in train if prompt.safety)
    assert not {json.dumps(prompt.dialog()) for prompt in train} & {json.dumps(prompt.dialog()) for prompt in held_out}
