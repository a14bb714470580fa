"""The bundled demo datasets (llama2_jax/assets/demo/), their generator and the checkable instructions."""

import collections
import random
import re

import pytest

from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.instructions import DEMO_DATA_DIR, Instruction, InstructionSet, load_characters_and_plays
from llama2_jax.data.records import RATING_LEVELS, parse_chat_record, parse_preference_record, parse_records
from llama2_jax.data.tokenizer import Tokenizer
from scripts import make_demo_data

CHARACTER = Instruction("character", "HAMLET")
PLAY = Instruction("play", "Hamlet")
COMBINATIONS = [InstructionSet((CHARACTER,)), InstructionSet((PLAY,)), InstructionSet((CHARACTER, PLAY))]
SPLITS = ("train", "validation")


def _records(name: str, parse) -> list[dict]:
    return [record for _, record in parse_records([DEMO_DATA_DIR / name], parse)]


def _dialogs(stem: str, split: str) -> list[list[dict[str, str]]]:
    return [dialog["messages"] for dialog in _records(f"{stem}_{split}.jsonl", parse_chat_record)]


def _preferences(split: str, models=("helpfulness", "safety")) -> list[dict]:
    return [pair for model in models for pair in _records(f"{model}_pairs_{split}.jsonl", parse_preference_record)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.mark.parametrize("instructions", COMBINATIONS, ids=["character", "play", "both"])
def test_an_applied_instruction_is_followed_once(instructions):
    answer = "Who's there?"
    assert not instructions.followed_by(answer)
    applied = instructions.apply(answer)
    assert instructions.followed_by(applied)
    assert instructions.apply(applied) == applied


def test_each_instruction_checks_its_own_mark():
    assert CHARACTER.apply("Who's there?") == "HAMLET: Who's there?"
    assert PLAY.apply("Who's there?") == "Who's there? (Hamlet)"
    assert not CHARACTER.followed_by(PLAY.apply("Who's there?"))
    assert not PLAY.followed_by(CHARACTER.apply("Who's there?"))
    assert not CHARACTER.followed_by("HAMLET. Who's there?")
    assert not InstructionSet((CHARACTER, PLAY)).followed_by(CHARACTER.apply("Who's there?"))


@pytest.mark.parametrize("instructions", COMBINATIONS, ids=["character", "play", "both"])
def test_short_and_long_forms_differ(instructions):
    short, long = instructions.text(short=True), instructions.text(short=False)
    assert short != long
    assert all(
        instruction.value in short and instruction.value in long for instruction in instructions.instructions
    )
    assert InstructionSet(instructions.instructions, short=True).text() == short
    assert InstructionSet(instructions.instructions, short=False).text() == long


def test_forms_as_the_paper_writes_them():
    assert CHARACTER.text(short=True) == "Figure: HAMLET"
    assert PLAY.text(short=True) == "Play: Hamlet"
    assert InstructionSet((PLAY,)).append_to("Who speaks this line?") == (
        "Who speaks this line?\n\nEnd every answer with the play's name, Hamlet."
    )


def test_malformed_instructions_are_refused():
    with pytest.raises(ValueError, match="instruction kind 'mood' is not one of"):
        Instruction("mood", "merry")
    with pytest.raises(ValueError, match="a play instruction needs a non-empty value"):
        Instruction("play", " ")
    with pytest.raises(ValueError, match=r"one instruction per kind, at least one; got \[\]"):
        InstructionSet(())
    with pytest.raises(ValueError, match=r"one instruction per kind, at least one; got \['character', 'character'\]"):
        InstructionSet((CHARACTER, Instruction("character", "OPHELIA")))


def test_samples_cover_every_combination_both_forms_and_only_known_names():
    characters, plays = load_characters_and_plays()
    assert "HAMLET" in characters and "Hamlet" in plays
    rng = random.Random(0)
    sampled = [InstructionSet.sample(rng, characters, plays) for _ in range(300)]
    kinds = {tuple(instruction.kind for instruction in instructions.instructions) for instructions in sampled}
    assert kinds == {("character",), ("play",), ("character", "play")}
    assert 100 < sum(instructions.short for instructions in sampled) < 200
    for instructions in sampled:
        for instruction in instructions.instructions:
            assert instruction.value in (characters if instruction.kind == "character" else plays)


@pytest.mark.parametrize("split", SPLITS)
def test_bundled_dialogs_load_and_fit(split, tokenizer):
    for stem, limit in make_demo_data.MAX_TOKENS.items():
        dialogs = _dialogs(stem, split)
        assert len(dialogs) == make_demo_data.COUNTS[split][stem]
        for messages in dialogs:
            encoded = encode_dialog(tokenizer, messages)  # raises on a reserved tag or a wrong role order
            assert encoded.loss_mask is not None and len(encoded.tokens) <= limit
    assert all(
        len(messages) // 2 in make_demo_data.GATT_TURNS for messages in _dialogs("gatt_dialogs", split)
    )


@pytest.mark.parametrize("split", SPLITS)
def test_bundled_preferences_load(split, tokenizer):
    pairs = _preferences(split)
    assert len(pairs) == make_demo_data.COUNTS[split]["preferences"]
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
        encode_dialog(tokenizer, pair["prompt"])
        assert pair["chosen_safe"] == make_demo_data.is_safe(pair["chosen"])
        assert pair["rejected_safe"] == make_demo_data.is_safe(pair["rejected"])
    # The safety model's pairs prefer a safe reply to an unsafe answer; the helpfulness model's rate answers.
    for pair in _preferences(split, ["safety"]):
        assert pair["chosen"] in make_demo_data.SAFE_REPLIES and not pair["rejected_safe"]
    assert not any(pair["chosen"] in make_demo_data.SAFE_REPLIES for pair in _preferences(split, ["helpfulness"]))


def test_instructed_answers_follow_their_instruction():
    instructed = 0
    for messages in _dialogs("dialogs", "train"):
        question, answer = messages[-2]["content"], messages[-1]["content"]
        if "\n\n" in question:
            instructed += 1
            text = question.rsplit("\n\n", 1)[1]
            instructions = _instructions_in(text)
            assert instructions.text() == text and instructions.followed_by(answer), (text, answer)
    assert (
        instructed == make_demo_data.DIALOG_SHARES["instruction"] * make_demo_data.COUNTS["train"]["dialogs"]
    )


def _instructions_in(text: str) -> InstructionSet:
    """The instruction set written as `text`, in either form."""
    if text.startswith(("Figure: ", "Play: ")):
        parts = [part.split(": ", 1) for part in text.split("; ")]
        return InstructionSet(
            tuple(Instruction("character" if key == "Figure" else "play", value) for key, value in parts),
            short=True,
        )
    found = []
    if character := re.search(r"Answer as (.+?), beginning with your name\.", text):
        found.append(Instruction("character", character[1]))
    if play := re.search(r"End every answer with the play's name, (.+)\.$", text):
        found.append(Instruction("play", play[1]))
    return InstructionSet(tuple(found))


def test_splits_share_no_speech():
    """Every quoted line belongs only to speeches of its own split, and a continuation is the next
    line of the quoted line's speech."""
    speeches = make_demo_data.parse_corpus(make_demo_data.CORPUS_DIR, make_demo_data.ParseReport())
    splits_of_line = collections.defaultdict(set)
    next_lines = collections.defaultdict(set)
    for speech in speeches:
        for line, next_line in zip(speech.lines, [*speech.lines[1:], ""]):
            splits_of_line[line].add("validation" if speech.held_out else "train")
            next_lines[line].add(next_line)
    for split in SPLITS:
        dialogs = _dialogs("dialogs", split) + _dialogs("gatt_dialogs", split)
        dialogs += [
            [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}]
            for pair in _preferences(split)
        ]
        for messages in dialogs:
            turns = [message for message in messages if message["role"] != "system"]
            for question, answer in zip(turns[::2], turns[1::2]):
                quoted = question["content"].split("\n")[1]
                assert splits_of_line[quoted] == {split}, quoted
                if (
                    question["content"].startswith("Continue this speech:")
                    and "\n\n" not in question["content"]
                ):
                    assert answer["content"] in next_lines[quoted] | {*make_demo_data.SAFE_REPLIES}


def test_preferences_cover_every_rating_and_safety_case():
    pairs = _preferences("train") + _preferences("validation")
    ratings = collections.Counter(pair["rating"] for pair in pairs)
    assert ratings == {level: len(pairs) // len(RATING_LEVELS) for level in range(len(RATING_LEVELS))}
    cases = collections.Counter((pair["chosen_safe"], pair["rejected_safe"]) for pair in pairs)
    assert cases[1, 0] > 0  # a safe answer preferred to an unsafe one
    assert cases[1, 1] + cases[0, 0] > 0  # both alike
    assert cases[0, 1] > 0  # unsafe preferred to safe: what the paper's safety reward model drops


def test_generator_reproduces_the_bundled_files(tmp_path):
    make_demo_data.main(["--out", str(tmp_path)])
    written = sorted(path.name for path in tmp_path.iterdir())
    # Everything bundled but the multiple-choice task (scripts/make_eval_task.py) comes from here.
    assert written == sorted(path.name for path in DEMO_DATA_DIR.iterdir() if path.name != "next_line_choice.jsonl")
    for name in written:
        assert (tmp_path / name).read_bytes() == (DEMO_DATA_DIR / name).read_bytes(), name
