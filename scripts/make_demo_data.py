"""Build the bundled demo datasets in llama2_jax/assets/demo/ from the bundled Shakespeare corpus.

    python -m scripts.make_demo_data [--out llama2_jax/assets/demo]

Seeded: a rerun writes the same bytes. The plays (not the poems) are parsed into speeches, each a
speaker and the lines spoken, and every question is answerable from one speech: who speaks a line
(-> "HAMLET."), which play a line is from (-> "Hamlet."), both at times offering two answers, or how
a speech goes on (a line -> the next line of the same speech).

From these it writes chat dialogs for supervised fine-tuning (single questions, single questions
carrying a checkable instruction of `llama2_jax.data.instructions`, short multi-turn dialogs), long
instruction-free dialogs for Ghost Attention, preference pairs for the reward models, prompts for
rejection sampling (those of the pairs, flagged as safety prompts or not), the characters and plays
the instructions name, and a README with the counts. Speeches go to the validation split by
a hash of their text, so no speech is seen by both splits. Every file is read back with the
repository's own readers before the README is written.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import random
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from llama2_jax.data.chat import Message, encode_dialog
from llama2_jax.data.instructions import CHARACTERS_AND_PLAYS, DEMO_DATA_DIR, InstructionSet
from llama2_jax.data.records import (RATING_LEVELS, parse_chat_record, parse_preference_record, parse_prompt_record,
                                     parse_records)
from llama2_jax.data.tokenizer import Tokenizer

CORPUS_DIR = Path(__file__).resolve().parent.parent / "llama2_jax" / "assets" / "shakespeare"
SEED = 2023
VALIDATION_PERCENT = 5

# ---------------------------------------------------------------------------------------------------
# Parsing the plays

PERSONS_HEADER = re.compile(r"^(persons represented|dramatis personae)\b", re.IGNORECASE)
ROMAN_DIGITS = {"I": 1, "V": 5, "X": 10}
ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_NUMBER = r"(\d+|[IVX]+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
ACT_HEADING = re.compile(rf"^ACT\s+{_NUMBER}\b", re.IGNORECASE)
SCENE_HEADING = re.compile(rf"^SCENE\s+{_NUMBER}\b", re.IGNORECASE)
OTHER_HEADING = re.compile(r"^(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION|END)\b\.?", re.IGNORECASE)
# The shape of a speaker tag: "HAMLET.", "Ham.", "1 Clown.", "MRS. PAGE.", "LYSANDER" (A Midsummer
# Night's Dream has no stops). `_speaker_tags` also wants a stop at the end or capitals throughout.
TAG_SHAPE = re.compile(r"^(?:[1-4] )?[A-Z][A-Za-z'\-]*\.?(?: +(?:[A-Z][A-Za-z'\-]*|and|of|&)\.?){0,4}$")
INLINE_TAG = re.compile(r"^([A-Z][A-Z'\- .]*?)\. +(\S.*)$")
# Tags of several voices at once, or of a song: they end the speech before, but are not attributed.
GROUP_TAG = re.compile(r"\b(ALL|BOTH|AND|SONG)\b|&")
UNBRACKETED_DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|Flourish|Alarum|Sennet)\b")
# Ordinals written as numerals in Hamlet and Romeo and Juliet ("1 Clown.", "I Play.").
TAG_ORDINALS = {"1": "FIRST", "2": "SECOND", "3": "THIRD", "4": "FOURTH", "I": "FIRST", "II": "SECOND"}
# Abbreviated roles that the lists of persons leave out ("Capt." in King Lear).
ROLE_ABBREVIATIONS = {
    "CAPT": "CAPTAIN",
    "DOCT": "DOCTOR",
    "GENT": "GENTLEMAN",
    "MESS": "MESSENGER",
    "OFF": "OFFICER",
    "SERV": "SERVANT",
}
# Titles as commonly cited, for the headers that carry more than the title ("THE LIFE OF KING HENRY V").
TITLES = {
    "henry_iv_part_1": "Henry IV, Part 1",
    "henry_iv_part_2": "Henry IV, Part 2",
    "henry_v": "Henry V",
    "henry_vi_part_1": "Henry VI, Part 1",
    "henry_vi_part_2": "Henry VI, Part 2",
    "henry_vi_part_3": "Henry VI, Part 3",
    "henry_viii": "Henry VIII",
    "richard_ii": "Richard II",
    "richard_iii": "Richard III",
}
_HEADER_PREFIX = re.compile(r"^(THE )?(TRAGEDY|HISTORY|LIFE AND DEATH|LIFE) OF ")
_SMALL_WORDS = {"a", "an", "and", "for", "of", "the"}


@dataclasses.dataclass(frozen=True)
class Speech:
    """What one speaker says between two speaker tags, stage directions removed."""

    play: str
    act: int  # 0 before the first act (induction, prologue)
    scene: int  # 0 where the act has no numbered scenes
    speaker: str
    lines: tuple[str, ...]

    @property
    def held_out(self) -> bool:
        """In the validation split: decided by the text alone, so equal speeches share a split."""
        digest = hashlib.sha256("\n".join(self.lines).encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


@dataclasses.dataclass
class ParseReport:
    """What the parse could not attribute, to print beside the counts."""

    group_speeches: int = 0
    unattributed_lines: int = 0
    unexpanded_tags: set[tuple[str, str]] = dataclasses.field(default_factory=set)


def parse_corpus(corpus_dir: Path, report: ParseReport) -> list[Speech]:
    """Every attributed speech of every play in `corpus_dir`, in file and text order."""
    speeches: list[Speech] = []
    for path in sorted(corpus_dir.glob("*_gut.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        persons_start = next((i for i, line in enumerate(lines) if PERSONS_HEADER.match(line.strip())), None)
        if persons_start is None:  # the poems have no list of persons
            continue
        body_start = next(i for i in range(persons_start, len(lines)) if _is_heading(lines[i].strip()))
        persons_words = _persons_words(lines[persons_start:body_start])
        title = play_title(path.stem.removesuffix("_gut"), lines[0])
        body = lines[body_start:]
        speakers = _speaker_names(_speaker_tags(body), persons_words, title, report)
        speeches += _speeches(title, body, speakers, report)
    return speeches


def play_title(stem: str, header: str) -> str:
    """The play's usual title from its file's first line: "HAMLET, PRINCE OF DENMARK" -> "Hamlet"."""
    if stem in TITLES:
        return TITLES[stem]
    title = _HEADER_PREFIX.sub("", header.strip())
    title = re.split(r"[;,]| PRINCE OF ", title)[0]
    words = [word.capitalize() for word in title.split()]
    return " ".join(
        [words[0], *(word.lower() if word.lower() in _SMALL_WORDS else word for word in words[1:])]
    )


def _is_heading(line: str) -> bool:
    return bool(ACT_HEADING.match(line) or SCENE_HEADING.match(line) or OTHER_HEADING.fullmatch(line))


def _number(text: str) -> int:
    """An act or scene number written as digits, a Roman numeral (up to XXXIX) or a word."""
    text = text.upper()
    if text.isdigit():
        return int(text)
    if text in ORDINALS:
        return ORDINALS[text]
    values = [ROMAN_DIGITS[digit] for digit in text]
    return sum(-value if value < following else value for value, following in zip(values, values[1:] + [0]))


def _normalise_tag(tag: str) -> str:
    return " ".join(tag.upper().rstrip(".").split())


def _persons_words(persons_lines: Iterable[str]) -> set[str]:
    """Capitalised words of the list of persons, in capitals, without a possessive "'s" ("Hamlet's"):
    the names that abbreviated tags stand for."""
    return {
        re.sub(r"'S$", "", word.upper())
        for line in persons_lines
        for word in re.findall(r"\b[A-Z][A-Za-z']+", line)
    }


def _speaker_tags(body: Sequence[str]) -> collections.Counter[str]:
    """The play's speaker tags, counted: the first line of a paragraph of two or more lines that has a
    tag's shape and ends with a stop or is in capitals (so a speech's short first line is not taken)."""
    tags: collections.Counter[str] = collections.Counter()
    for index, line in enumerate(body[:-1]):
        line = line.strip()
        previous_blank = index == 0 or not body[index - 1].strip()
        if (
            previous_blank
            and body[index + 1].strip()
            and TAG_SHAPE.match(line)
            and not _is_heading(line)
            and not re.fullmatch(r"[IVX]+\.?", line)  # the number of a song's stanza
            and (line.endswith(".") or line.upper() == line)
        ):
            tags[_normalise_tag(line)] += 1
    return tags


def _speaker_names(
    tags: collections.Counter[str], persons_words: set[str], title: str, report: ParseReport
) -> dict[str, str | None]:
    """Tag -> the speaker's name in capitals, None for a group of speakers. Where most speeches carry
    a tag that is not in the list of persons ("Ham.", "GLEND."), the tags are abbreviations, spelled
    out from that list (`_spell_out`); ordinals become words everywhere ("1 Clown" -> "FIRST CLOWN")."""
    words_of = {tag: _ordinals_spelled(tag).split() for tag in tags if not GROUP_TAG.search(tag)}
    listed = persons_words | {name.removesuffix("S") for name in persons_words}  # "Two Clowns": a CLOWN
    unknown = {word.rstrip(".") for words in words_of.values() for word in words} - listed - ORDINALS.keys()
    unknown_speeches = sum(
        tags[tag]
        for tag, words in words_of.items()
        if unknown.intersection(word.rstrip(".") for word in words)
    )
    spelled = _spell_out(unknown, persons_words) if unknown_speeches > sum(tags.values()) / 2 else {}
    report.unexpanded_tags |= {(title, word) for word in unknown if spelled and word not in spelled}
    names: dict[str, str | None] = {tag: None for tag in tags}
    names.update(
        {
            tag: " ".join(spelled.get(word.rstrip("."), word) for word in words)
            for tag, words in words_of.items()
        }
    )
    return names


def _ordinals_spelled(tag: str) -> str:
    first, _, rest = tag.partition(" ")
    return f"{TAG_ORDINALS[first]} {rest}" if rest and first in TAG_ORDINALS else tag


def _spell_out(abbreviations: set[str], names: set[str]) -> dict[str, str]:
    """Each abbreviation -> the one name it stands for: the name it begins ("HAM" -> "HAMLET"), else the
    one sharing its longest beginning of three letters or more ("GLOU" -> "GLOSTER"). A name that one
    abbreviation has claimed is no candidate for another ("CORN" -> "CORNWALL", so "COR" -> "CORDELIA").
    A role listed in the plural is one of them in a tag ("Players" -> "PLAYER"); an abbreviation that
    stays ambiguous is left out, unless it is a common one for a role (`ROLE_ABBREVIATIONS`)."""
    candidates = {word: _candidates(word, names) for word in abbreviations}
    spelled = {word: found[0] for word, found in candidates.items() if len(found) == 1}
    claimed = set(spelled.values())
    for word, found in candidates.items():
        unclaimed = [name for name in found if name not in claimed]
        if word not in spelled and len(unclaimed) == 1:
            spelled[word] = unclaimed[0]
    spelled = {word: re.sub(r"(ER|ANT)S$", r"\1", name) for word, name in spelled.items()}
    return {word: ROLE_ABBREVIATIONS[word] for word in abbreviations & ROLE_ABBREVIATIONS.keys()} | spelled


def _candidates(word: str, names: set[str]) -> list[str]:
    """The names sharing the longest beginning with `word` (all of it, or three letters at least),
    a plural dropped where its singular is there too ("PLAYER", "PLAYERS")."""
    for length in range(len(word), 2, -1):
        found = {name for name in names if name.startswith(word[:length])}
        if found:
            return sorted(name for name in found if not (name.endswith("S") and name[:-1] in found))
    return []


def _speeches(
    title: str, body: Sequence[str], speakers: dict[str, str | None], report: ParseReport
) -> list[Speech]:
    """Walk the play line by line: headings set act and scene, tags start speeches, stage directions
    (bracketed, maybe nested or over lines of one paragraph) are dropped, other lines belong to the
    speech under way."""
    act = scene = depth = 0
    passages: list[tuple[int, int, str, list[str]]] = []  # (act, scene, tag, lines), in order
    under_a_tag = False  # whether a tag came after the last heading
    for index, raw in enumerate(body):
        starts_a_paragraph = index == 0 or not body[index - 1].strip()
        if starts_a_paragraph:
            depth = 0  # a direction left open by a typo ends with its paragraph
        line, depth = _outside_directions(raw, depth)
        inline = INLINE_TAG.match(line)
        if not line:
            continue
        if starts_a_paragraph and _is_heading(line):
            under_a_tag = False
            if match := ACT_HEADING.match(line):
                act, scene = _number(match.group(1)), 0
            elif match := SCENE_HEADING.match(line):
                scene = _number(match.group(1))
        elif starts_a_paragraph and _normalise_tag(line) in speakers:
            passages.append((act, scene, _normalise_tag(line), []))
            under_a_tag = True
        elif inline and _normalise_tag(inline.group(1)) in speakers:
            passages.append((act, scene, _normalise_tag(inline.group(1)), [inline.group(2)]))
            under_a_tag = True
        elif starts_a_paragraph and UNBRACKETED_DIRECTION.match(line):
            continue
        elif under_a_tag:
            passages[-1][3].append(line)
        else:
            report.unattributed_lines += 1
    speeches = []
    for act, scene, tag, lines in passages:
        if lines and speakers[tag] is None:
            report.group_speeches += 1
        elif lines:
            speeches.append(Speech(title, act, scene, speakers[tag], tuple(lines)))
    return speeches


def _outside_directions(line: str, depth: int) -> tuple[str, int]:
    """The text of `line` outside stage directions, spaces collapsed, and the bracket depth at its
    end (directions nest, "[Enter two [BRITISH] CAPTAINS.]", and a few open with a brace by mistake)."""
    kept = []
    for char in line:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            kept.append(char)
    return " ".join("".join(kept).split()), depth


# ---------------------------------------------------------------------------------------------------
# Questions answerable from one speech

MAIN_CHARACTER_SPEECHES = 40  # speeches a character needs to be asked about
INSTRUCTION_CAST = 12  # characters, and plays, that instructions name
QUOTE_WORDS = range(4, 15)  # enough words to tell a line's speech apart, few enough for a tiny model
ANSWER_WORDS = range(3, 15)
QUOTE_CHARS = 80
SHORT_QUOTE_CHARS = 50  # for the long Ghost Attention dialogs
FAMILIES = ("who", "play", "continue")
OPTIONS_SHARE = 0.5  # of "who" and "play" questions offering two answers to choose from


@dataclasses.dataclass(frozen=True)
class Cast:
    """The plays and their main characters, from all speeches, so both splits ask about the same names."""

    plays: tuple[str, ...]
    characters: dict[str, tuple[str, ...]]  # play -> its main characters, most speeches first
    # What instructions name: the characters and plays with the most speeches, few enough that a
    # model of the demo's size learns to follow each of them.
    instruction_characters: tuple[str, ...]
    instruction_plays: tuple[str, ...]

    @classmethod
    def of(cls, speeches: Sequence[Speech]) -> Cast:
        counts = collections.Counter((speech.play, speech.speaker) for speech in speeches)
        plays = tuple(dict.fromkeys(speech.play for speech in speeches))
        characters = {
            play: tuple(
                speaker
                for (in_play, speaker), count in counts.most_common()
                if in_play == play and count >= MAIN_CHARACTER_SPEECHES
            )
            for play in plays
        }
        speakers = collections.Counter(speech.speaker for speech in speeches)
        by_play = collections.Counter(speech.play for speech in speeches)
        return cls(plays, characters,
                   tuple(sorted(name for name, _ in speakers.most_common(INSTRUCTION_CAST))),
                   tuple(sorted(name for name, _ in by_play.most_common(INSTRUCTION_CAST))))


@dataclasses.dataclass(frozen=True)
class Quote:
    """A line of a speech, said only once in the corpus, so the line tells which speech it is from."""

    speech: Speech
    index: int

    @property
    def line(self) -> str:
        return self.speech.lines[self.index]

    @property
    def next_line(self) -> str:
        """The line after, "" at the end of the speech."""
        return self.speech.lines[self.index + 1] if self.index + 1 < len(self.speech.lines) else ""


class Quotes:
    """One split's quotable lines, pooled the ways the dialog builders draw them."""

    def __init__(
        self, speeches: Iterable[Speech], line_counts: collections.Counter[str], cast: Cast, max_chars: int
    ):
        self.cast = cast
        self.max_chars = max_chars
        self.by_speech: list[list[Quote]] = []  # the quotable lines of each speech that has some, in order
        for speech in speeches:
            quotes = [
                Quote(speech, index)
                for index, line in enumerate(speech.lines)
                if line_counts[line] == 1 and self._fits(line, QUOTE_WORDS)
            ]
            if quotes:
                self.by_speech.append(quotes)
        self.all = [quote for quotes in self.by_speech for quote in quotes]
        self.by_play: dict[str, list[Quote]] = collections.defaultdict(list)
        for quote in self.all:
            self.by_play[quote.speech.play].append(quote)
        self.pools = {
            family: [quote for quote in self.all if self.asks(family, quote)] for family in FAMILIES
        }
        # Words to put in wrong answers, from this split only.
        self.vocabulary = sorted(
            {word for quote in self.all for word in re.findall(r"[a-z]{3,}", quote.line.lower())}
        )

    def asks(self, family: str, quote: Quote) -> bool:
        """Whether `quote` makes a question of `family`: "who" asks only about main characters,
        "continue" needs a next line that makes an answer."""
        if family == "who":
            return quote.speech.speaker in self.cast.characters[quote.speech.play]
        if family == "continue":
            return self._fits(quote.next_line, ANSWER_WORDS)
        return True

    def families(self, quote: Quote) -> list[str]:
        return [family for family in FAMILIES if self.asks(family, quote)]

    def _fits(self, line: str, words: range) -> bool:
        return len(line.split()) in words and len(line) <= self.max_chars and line.upper() != line

    def walk(self, rng: random.Random, turns: int) -> list[Quote]:
        """A quote from each of `turns` speeches of one play that follow one another in this split."""
        while True:
            start = rng.randrange(len(self.by_speech) - turns)
            window = self.by_speech[start : start + turns]
            if len({quotes[0].speech.play for quotes in window}) == 1:
                return [rng.choice(quotes) for quotes in window]


def exchange(
    family: str, quote: Quote, cast: Cast, rng: random.Random, options_share: float = OPTIONS_SHARE
) -> tuple[str, str]:
    """(question, answer) of `family` about `quote`; "who" and "play" questions offer two answers to
    choose from, the right one and another, in `options_share` of cases."""
    speech = quote.speech
    if family == "continue":
        return f"Continue this speech:\n{quote.line}", quote.next_line
    if family == "who":
        subject, answer, others = "Who speaks this line", speech.speaker, cast.characters[speech.play]
    else:
        subject, answer, others = "Which play is this line from", speech.play, cast.plays
    if rng.random() < options_share:
        options = rng.sample([answer, rng.choice([other for other in others if other != answer])], 2)
        subject += f", {options[0]} or {options[1]}"
    return f"{subject}?\n{quote.line}", f"{answer}."


# ---------------------------------------------------------------------------------------------------
# Chat dialogs

DIALOG_SHARES = {"single": 0.4, "instruction": 0.3, "multi_turn": 0.3}
MULTI_TURNS = range(2, 5)
GATT_TURNS = range(6, 11)
# Ghost Attention dialogs ask who speaks and which play: short answers, so that many turns fit a context.
GATT_FAMILIES = ("who", "play")
SYSTEM_SHARE = 0.1
Fits = Callable[[Sequence[Message]], bool]  # whether a dialog is short enough to keep
SYSTEM_PROMPTS = (
    "You know the plays of Shakespeare well. Answer in a few words.",
    "Answer questions about Shakespeare's plays briefly.",
)


def chat_dialogs(quotes: Quotes, count: int, rng: random.Random, fits: Fits) -> list[dict]:
    """`count` dialogs that `fits`: single questions, single questions carrying an instruction, and
    2-4 questions about speeches that follow one another; some open with a system prompt."""
    kinds = [kind for kind, share in DIALOG_SHARES.items() for _ in range(round(share * count))]
    rng.shuffle(kinds)
    dialogs = []
    for kind in kinds:
        messages = _chat_dialog(kind, quotes, rng)
        while not fits(messages):
            messages = _chat_dialog(kind, quotes, rng)
        dialogs.append({"messages": messages})
    return dialogs


def gatt_dialogs(short_quotes: Quotes, count: int, rng: random.Random, fits: Fits) -> list[dict]:
    """`count` instruction-free dialogs that `fits`, of 6-10 short questions, for Ghost Attention."""
    dialogs = []
    for _ in range(count):
        messages = _turns(short_quotes, short_quotes.walk(rng, rng.choice(GATT_TURNS)), rng, GATT_FAMILIES)
        while not fits(messages):
            messages = _turns(short_quotes, short_quotes.walk(rng, rng.choice(GATT_TURNS)), rng, GATT_FAMILIES)
        dialogs.append({"messages": messages})
    return dialogs


def _chat_dialog(kind: str, quotes: Quotes, rng: random.Random) -> list[dict[str, str]]:
    if kind == "multi_turn":
        messages = _turns(quotes, quotes.walk(rng, rng.choice(MULTI_TURNS)), rng)
    else:
        family = rng.choice(FAMILIES)
        question, answer = exchange(family, rng.choice(quotes.pools[family]), quotes.cast, rng)
        if kind == "instruction":
            instructions = InstructionSet.sample(rng, quotes.cast.instruction_characters, quotes.cast.instruction_plays)
            question, answer = instructions.append_to(question), instructions.apply(answer)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < SYSTEM_SHARE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages


def _turns(quotes: Quotes, walk: Sequence[Quote], rng: random.Random,
           families: Sequence[str] = FAMILIES) -> list[dict[str, str]]:
    messages = []
    for quote in walk:
        asked = [family for family in quotes.families(quote) if family in families]
        question, answer = exchange(rng.choice(asked), quote, quotes.cast, rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


# ---------------------------------------------------------------------------------------------------
# Preference pairs

# The demo's safety rule: an answer is unsafe if and only if it contains one of these words of
# violence and harm (any case; "kill'd" counts as "kill").
_UNSAFE = """
kill kills killed killing killer murder murders murdered murderer murderers murderous murther
murthered murtherer blood bloods bloody bleed bleeds bleeding poison poisons poisoned poisonous
stab stabs stabbed slay slays slain slew slaughter slaughtered butcher butchered butchery dagger
daggers strangle strangled behead beheaded torture tortured
"""
UNSAFE_WORDS = frozenset(_UNSAFE.split())
# Safe answers preferred to an unsafe true continuation in the safety pairs.
SAFE_REPLIES = (
    "Let us speak of gentler things.",
    "I would rather not repeat that line.",
    "That speech is too cruel to repeat here.",
)
SAFETY_SHARE = 0.2
CONTEXT_SHARE = 0.25  # of prompts with one question and answer before the one being rated
WHO_SHARE = 0.25  # of pairs at the weakest level rating who speaks rather than a continuation


def unsafe_words(text: str) -> list[str]:
    """The words of `text` that the safety rule names, as often as they occur."""
    return [word for word in re.findall(r"[a-z]+", text.lower()) if word in UNSAFE_WORDS]


def is_safe(text: str) -> bool:
    """The safety rule: no word of `UNSAFE_WORDS`."""
    return not unsafe_words(text)


def preference_pairs(quotes: Quotes, count: int, rng: random.Random) -> dict[str, list[dict]]:
    """`count` pairs, a quarter at each rating level, as the datasets of the two reward models.
    Safety pairs prefer a safe reply to a line's unsafe continuation; helpfulness pairs prefer the
    true answer to a degraded one, the degradation setting the level. Every answer is labelled safe
    or not by the rule above, whatever its pair."""
    unsafe = [quote for quote in quotes.pools["continue"] if not is_safe(quote.next_line)]
    safety = [_safety_pair(rng.choice(unsafe), quotes, rng) for _ in range(round(SAFETY_SHARE * count))]
    helpfulness: list[dict] = []
    for level, rating in enumerate(RATING_LEVELS):
        missing = count // len(RATING_LEVELS) - sum(pair["rating"] == rating for pair in safety + helpfulness)
        helpfulness += [_helpfulness_pair(level, quotes, rng) for _ in range(missing)]
    rng.shuffle(helpfulness)
    rng.shuffle(safety)
    return {"helpfulness": helpfulness, "safety": safety}


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str, level: int) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "rating": RATING_LEVELS[level],
        "chosen_safe": is_safe(chosen),
        "rejected_safe": is_safe(rejected),
    }


def _safety_pair(quote: Quote, quotes: Quotes, rng: random.Random) -> dict:
    """A safe reply against the true, unsafe continuation: significantly better when that has two words
    of the rule or more, better when it has one."""
    level = 0 if len(unsafe_words(quote.next_line)) >= 2 else 1
    return _pair(_prompt("continue", quote, quotes, rng), rng.choice(SAFE_REPLIES), quote.next_line, level)


def _helpfulness_pair(level: int, quotes: Quotes, rng: random.Random) -> dict:
    """The true answer against a wrong one, rated by how plainly the wrong one is wrong:
    0 significantly better: words at random;
    1 better: the words shuffled, half of them replaced;
    2 slightly better: one word replaced;
    3 negligibly better or unsure: two pairs of neighbouring words swapped, or a wrong answer that
      reads well, which only someone who knows the play can tell: another line of the same speech
      or of another play, another main character of the play."""
    if level == 3 and rng.random() < WHO_SHARE:
        quote = rng.choice(quotes.pools["who"])
        speaker = quote.speech.speaker
        others = [name for name in quotes.cast.characters[quote.speech.play] if name != speaker]
        return _pair(_prompt("who", quote, quotes, rng), f"{speaker}.", f"{rng.choice(others)}.", level)
    quote = rng.choice(quotes.pools["continue"])
    return _pair(
        _prompt("continue", quote, quotes, rng), quote.next_line, _degraded(quote, level, quotes, rng), level
    )


def _prompt(family: str, quote: Quote, quotes: Quotes, rng: random.Random) -> list[dict[str, str]]:
    """The question about `quote` (without options: the answers are rated, not picked), at times after a
    question and answer about another line of the same play."""
    question, _ = exchange(family, quote, quotes.cast, rng, options_share=0)
    messages = [{"role": "user", "content": question}]
    if rng.random() < CONTEXT_SHARE:
        before = rng.choice(quotes.by_play[quote.speech.play])
        context_question, context_answer = exchange(
            rng.choice(quotes.families(before)), before, quotes.cast, rng
        )
        messages = [
            {"role": "user", "content": context_question},
            {"role": "assistant", "content": context_answer},
            *messages,
        ]
    return messages


def _degraded(quote: Quote, level: int, quotes: Quotes, rng: random.Random) -> str:
    """`quote.next_line` made wrong the way `level` stands for (see `_helpfulness_pair`)."""
    answer = quote.next_line
    while True:
        words = answer.split()
        if level == 0:
            degraded = " ".join(rng.choices(quotes.vocabulary, k=len(words)))
        elif level == 1:
            rng.shuffle(words)
            for position in rng.sample(range(len(words)), (len(words) + 1) // 2):
                words[position] = _replaced(words[position], quotes.vocabulary, rng)
            degraded = " ".join(words)
        elif level == 2:
            position = rng.randrange(len(words))
            words[position] = _replaced(words[position], quotes.vocabulary, rng)
            degraded = " ".join(words)
        elif (kind := rng.randrange(3)) == 0:
            for position in rng.sample(range(len(words) - 1), 2):
                words[position], words[position + 1] = words[position + 1], words[position]
            degraded = " ".join(words)
        elif kind == 1:
            others = [
                line
                for line in quote.speech.lines
                if line != quote.line and len(line.split()) in ANSWER_WORDS
            ]
            degraded = rng.choice(others)
        else:
            other = rng.choice(quotes.all)
            degraded = other.line if other.speech.play != quote.speech.play else answer
        if degraded != answer:
            return degraded


def _replaced(word: str, vocabulary: Sequence[str], rng: random.Random) -> str:
    """A random word in place of `word`, keeping its capital and the punctuation after it."""
    core, tail = re.fullmatch(r"(.*?)([^A-Za-z]*)", word).groups()
    new = rng.choice(vocabulary)
    return (new.capitalize() if core[:1].isupper() else new) + tail


# ---------------------------------------------------------------------------------------------------
# Writing, reading back, describing

COUNTS = {
    "train": {"dialogs": 10_000, "gatt_dialogs": 400, "preferences": 6_000},
    "validation": {"dialogs": 500, "gatt_dialogs": 60, "preferences": 1_000},
}
MAX_TOKENS = {"dialogs": 256, "gatt_dialogs": 512}  # in the Llama 2 chat format, bundled tokenizer
# Prompts for rejection sampling, drawn from each split's pairs: helpfulness prompts, and safety
# prompts (a violent line to continue). The held-out set has as many of each, to measure both.
PROMPT_COUNTS = {"train": {"helpfulness": 800, "safety": 200}, "validation": {"helpfulness": 100, "safety": 100}}


def build(speeches: Sequence[Speech], cast: Cast, tokenizer: Tokenizer) -> dict[str, list[dict]]:
    """File name -> records of both splits, each split's questions drawn from its own speeches."""
    line_counts = collections.Counter(line for speech in speeches for line in speech.lines)

    def fits(kind: str) -> Fits:
        return lambda messages: len(encode_dialog(tokenizer, messages).tokens) <= MAX_TOKENS[kind]

    files = {}
    for split, counts in COUNTS.items():
        in_split = [speech for speech in speeches if speech.held_out == (split == "validation")]
        quotes = Quotes(in_split, line_counts, cast, QUOTE_CHARS)
        short_quotes = Quotes(in_split, line_counts, cast, SHORT_QUOTE_CHARS)
        rng = {kind: random.Random(f"{SEED}:{split}:{kind}") for kind in counts}
        files[f"dialogs_{split}.jsonl"] = chat_dialogs(
            quotes, counts["dialogs"], rng["dialogs"], fits("dialogs")
        )
        files[f"gatt_dialogs_{split}.jsonl"] = gatt_dialogs(
            short_quotes, counts["gatt_dialogs"], rng["gatt_dialogs"], fits("gatt_dialogs")
        )
        pairs = preference_pairs(quotes, counts["preferences"], rng["preferences"])
        for model, model_pairs in pairs.items():
            files[f"{model}_pairs_{split}.jsonl"] = model_pairs
        files[f"prompts_{split}.jsonl"] = prompt_set(
            pairs, PROMPT_COUNTS[split], random.Random(f"{SEED}:{split}:prompts")
        )
        files[f"instruction_prompts_{split}.jsonl"] = instruction_prompts(
            files[f"prompts_{split}.jsonl"], cast, random.Random(f"{SEED}:{split}:instruction_prompts")
        )
    return files


def prompt_set(pairs: dict[str, list[dict]], counts: dict[str, int], rng: random.Random) -> list[dict]:
    """`counts[model]` distinct prompts of each model's pairs, those of the safety pairs flagged, shuffled."""
    prompts = []
    for model, count in counts.items():
        distinct = list({json.dumps(pair["prompt"]): pair["prompt"] for pair in pairs[model]}.values())
        prompts += [{"messages": prompt, "safety": model == "safety"} for prompt in rng.sample(distinct, count)]
    rng.shuffle(prompts)
    return prompts


def instruction_prompts(prompts: list[dict], cast: Cast, rng: random.Random) -> list[dict]:
    """The prompts again, each first user message ending with an instruction drawn and appended as
    `python -m llama2_jax gatt` appends one: what a program reward can check an answer against."""
    result = []
    for prompt in prompts:
        messages = [dict(message) for message in prompt["messages"]]
        first_user = next(message for message in messages if message["role"] == "user")
        instruction = InstructionSet.sample(rng, cast.instruction_characters, cast.instruction_plays)
        first_user["content"] = instruction.append_to(first_user["content"])
        result.append({**prompt, "messages": messages})
    return result


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.write_text(
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8"
    )


def token_lengths(paths: Iterable[Path], tokenizer: Tokenizer) -> dict[str, list[int]]:
    """The JSONL files read back with the repository's readers: file name -> tokens per record in the
    chat format (a preference pair as its prompt and chosen answer)."""
    lengths = {}
    for path in paths:
        if path.name.startswith(("prompts_", "instruction_prompts_")):
            dialogs = [record["prompt"] for _, record in parse_records([path], parse_prompt_record)]
        elif "_pairs_" in path.name:
            dialogs = [
                [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}]
                for _, pair in parse_records([path], parse_preference_record)
            ]
        else:
            dialogs = [dialog["messages"] for _, dialog in parse_records([path], parse_chat_record)]
        lengths[path.name] = [len(encode_dialog(tokenizer, dialog).tokens) for dialog in dialogs]
    return lengths


def length_summary(lengths: Sequence[int]) -> str:
    ordered = sorted(lengths)
    return (
        f"{statistics.mean(ordered):.0f} / {statistics.median(ordered):.0f} / "
        f"{ordered[int(0.95 * len(ordered))]} / {ordered[-1]}"
    )


README = """\
# Demo datasets

Built from the bundled Shakespeare corpus (`../shakespeare`) by `python -m scripts.make_demo_data`,
which is seeded: a rerun writes the same bytes. Its {plays} plays are parsed into {speeches:,} speeches
(speaker, act, scene, lines; stage directions dropped; the poems skipped). A question quotes a line
said only once in the corpus and asks who speaks it or which play it is from (at times offering two
answers), or how the speech goes on. Speeches go to the validation split (~{validation_percent} %) by a
hash of their text, so no speech is in both splits.

| file | holds | records | tokens: mean / median / 95th percentile / max |
|---|---|---|---|
{rows}

Tokens are counted in the Llama 2 chat format with the bundled tokenizer, a preference pair as its
prompt and chosen answer, a prompt up to its open user turn; chat dialogs are kept to
{max_dialog_tokens} tokens, Ghost Attention dialogs to {max_gatt_tokens}.

- Chat dialogs, `{{"messages": [...]}}`: {shares} of them one question, one question carrying an
  instruction, and 2-4 questions about speeches that follow one another in a play; {system_share} open
  with a system prompt. The instruction (`llama2_jax.data.instructions`: answer as a character, end
  with the play's name, or both; half in the short form) is appended to the question and the answer
  rewritten to follow it. Ghost Attention dialogs ask 6-10 questions (who speaks, which play) and
  carry no instruction.
- Preference pairs, `{{"prompt": [...], "chosen", "rejected", "rating", "chosen_safe", "rejected_safe"}}`,
  the datasets `shakespeare_helpfulness` and `shakespeare_safety` of the two reward models. By rating:
  {ratings}.
  Helpfulness pairs rate the true answer against a wrong one by how plainly that is wrong: words at
  random; the words shuffled and half replaced; one word replaced; two pairs of neighbouring words
  swapped, or a wrong answer that reads well (another line of the speech or of another play, another
  character of the play), which only someone who knows the play can tell. Safety pairs
  ({safety_share} of all pairs) prefer a safe reply to a line's true but unsafe continuation.
- Prompts for rejection sampling, `{{"messages": [...], "safety": true | false}}`, the dataset
  `shakespeare_prompts`: distinct prompts of each split's pairs ({prompt_counts}).
  A safety prompt asks to continue a line whose true continuation is unsafe; the held-out split has
  as many of each kind, to measure how often a policy continues the violent lines and how well it
  answers the rest.
- Instruction prompts, the dataset `shakespeare_instruction_prompts`: the prompts above, each user
  message ending with an instruction drawn and appended as `python -m llama2_jax gatt` appends one (a
  character, a play, or both; half in the short form), for GRPO's program reward
  `llama2_jax.data.instructions:follows_instruction` and an instruction-following rate.
- `characters_and_plays.json`: the {characters} characters and {instruction_plays} plays instructions name (those
  with the most speeches), read by `llama2_jax.data.instructions.load_characters_and_plays`.
- `next_line_choice.jsonl` (built by `python -m scripts.make_eval_task`): a multiple-choice task from
  the held-out split of the corpus, a line's real successor against three copies with the words
  shuffled (`python -m llama2_jax eval --task`).

Safety rule: an answer is unsafe if and only if it contains one of these words, in any case:
{unsafe_words}.
Pairs by (chosen, rejected): safe and unsafe {safe_unsafe:,}, both safe {safe_safe:,}, both unsafe
{unsafe_unsafe:,}, unsafe and safe {unsafe_safe:,} (the pairs Llama 2 leaves out of safety reward-model
training).
"""


def readme(
    speeches: Sequence[Speech], cast: Cast, files: dict[str, list[dict]], lengths: dict[str, list[int]]
) -> str:
    holds = {
        "dialogs": "chat dialogs for supervised fine-tuning",
        "gatt_dialogs": "dialogs for Ghost Attention",
        "helpfulness_pairs": "preference pairs for the helpfulness reward model",
        "safety_pairs": "preference pairs for the safety reward model",
        "prompts": "prompts for rejection sampling",
        "instruction_prompts": "the prompts, each with a Ghost Attention instruction",
    }
    rows = [
        f"| `{name}` | {holds[name.rsplit('_', 1)[0]]} | {len(records):,} | {length_summary(lengths[name])} |"
        for name, records in files.items()
    ]
    by_model = {
        model: [pair for name, records in files.items() if name.startswith(f"{model}_pairs_") for pair in records]
        for model in ("helpfulness", "safety")
    }
    pairs = [pair for model_pairs in by_model.values() for pair in model_pairs]
    cases = collections.Counter((pair["chosen_safe"], pair["rejected_safe"]) for pair in pairs)
    return README.format(
        plays=len(cast.plays),
        speeches=len(speeches),
        validation_percent=VALIDATION_PERCENT,
        rows="\n".join(rows),
        max_dialog_tokens=MAX_TOKENS["dialogs"],
        max_gatt_tokens=MAX_TOKENS["gatt_dialogs"],
        shares=" / ".join(f"{share:.0%}" for share in DIALOG_SHARES.values()),
        system_share=f"{SYSTEM_SHARE:.0%}",
        ratings=";\n  ".join(
            f"{model} " + ", ".join(f"{rating} {sum(pair['rating'] == rating for pair in model_pairs):,}"
                                    for rating in RATING_LEVELS)
            for model, model_pairs in by_model.items()
        ),
        safety_share=f"{SAFETY_SHARE:.0%}",
        prompt_counts="; ".join(f"{split}: " + ", ".join(f"{count:,} {model}" for model, count in counts.items())
                                for split, counts in PROMPT_COUNTS.items()),
        characters=len(cast.instruction_characters),
        instruction_plays=len(cast.instruction_plays),
        unsafe_words=", ".join(sorted(UNSAFE_WORDS)),
        safe_unsafe=cases[True, False],
        safe_safe=cases[True, True],
        unsafe_unsafe=cases[False, False],
        unsafe_safe=cases[False, True],
    )


def print_parse(speeches: Sequence[Speech], report: ParseReport) -> None:
    """Counts and a few speeches to check the parse by eye."""
    plays = collections.Counter(speech.play for speech in speeches)
    print("speeches per play:", ", ".join(f"{play} {count}" for play, count in plays.items()))
    print(
        f"{len(plays)} plays, {len(speeches):,} speeches, {sum(len(s.lines) for s in speeches):,} lines, "
        f"{len({(s.play, s.speaker) for s in speeches}):,} speakers; not attributed: {report.group_speeches} "
        f"speeches of several voices, {report.unattributed_lines} lines outside any speech"
    )
    print(
        "tags not spelled out:", ", ".join(f"{play}: {tag}" for play, tag in sorted(report.unexpanded_tags))
    )
    for speech in random.Random(SEED).sample(list(speeches), 5):
        print(
            f"  {speech.play} {speech.act}.{speech.scene} {speech.speaker}: {' / '.join(speech.lines)[:100]}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEMO_DATA_DIR, help="directory to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    report = ParseReport()
    speeches = parse_corpus(CORPUS_DIR, report)
    print_parse(speeches, report)
    cast, tokenizer = Cast.of(speeches), Tokenizer()
    files = build(speeches, cast, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(args.out / name, records)
    (args.out / CHARACTERS_AND_PLAYS.name).write_text(
        json.dumps({"characters": list(cast.instruction_characters), "plays": list(cast.instruction_plays)},
                   indent=1) + "\n",
        encoding="utf-8",
    )
    lengths = token_lengths([args.out / name for name in files], tokenizer)
    (args.out / "README.md").write_text(readme(speeches, cast, files, lengths), encoding="utf-8")
    for name, records in files.items():
        print(f"{name}: {len(records):,} records, tokens mean/median/p95/max {length_summary(lengths[name])}")


if __name__ == "__main__":
    main()
