"""Instructions about Shakespeare's characters and plays that a program can check an answer against.

The Llama 2 paper's Ghost Attention appends an instruction ("Act as Napoleon", "Speak in French", or
both) to the user turns of a dialog, half of them in a terse form ("Figure: Napoleon"), and trains on
answers that keep following it. Judging "acts as Napoleon" needs a person or a model; here each
instruction asks for a visible mark instead, so data can be built by rewriting answers (`apply`) and
a model scored by a plain test (`followed_by`, or `follows_instruction`, which reads the instruction
back from a prompt: GRPO's bundled program reward, `grpo.reward_fn`):

- character HAMLET: "Answer as HAMLET, ..." or "Figure: HAMLET"; the answer starts with "HAMLET: ".
- play Hamlet: "End every answer with the play's name, Hamlet." or "Play: Hamlet"; the answer ends
  with "(Hamlet)".

The characters and plays come from the bundled corpus: `scripts/make_demo_data.py` writes the ones it
parsed to `assets/demo/characters_and_plays.json`, read by `load_characters_and_plays`.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama2_jax.data.config import DEMO_DATA_DIR

CHARACTERS_AND_PLAYS = DEMO_DATA_DIR / "characters_and_plays.json"

Kind = Literal["character", "play"]
KINDS: tuple[Kind, ...] = ("character", "play")
# What `sample` draws: each kind alone, or both together, as often as one another.
_COMBINATIONS: tuple[tuple[Kind, ...], ...] = (("character",), ("play",), ("character", "play"))


@dataclass(frozen=True)
class Instruction:
    """Answer as a character (`value` the speaker's name, e.g. "HAMLET") or name a play ("Hamlet")."""

    kind: Kind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"instruction kind {self.kind!r} is not one of {KINDS}")
        if not self.value.strip():
            raise ValueError(f"a {self.kind} instruction needs a non-empty value")

    def text(self, short: bool) -> str:
        """The instruction as a user would write it: a sentence, or the paper's terse `Key: value`."""
        if self.kind == "character":
            return f"Figure: {self.value}" if short else f"Answer as {self.value}, beginning with your name."
        return f"Play: {self.value}" if short else f"End every answer with the play's name, {self.value}."

    def followed_by(self, answer: str) -> bool:
        """Whether `answer` carries the mark; exact, so strip a decoded answer before asking."""
        if self.kind == "character":
            return answer.startswith(self._prefix)
        return answer.endswith(self._suffix)

    def apply(self, answer: str) -> str:
        """`answer` rewritten to follow the instruction; one that already does is returned as it is."""
        if self.followed_by(answer):
            return answer
        return self._prefix + answer if self.kind == "character" else f"{answer} {self._suffix}"

    @property
    def _prefix(self) -> str:
        return f"{self.value}: "

    @property
    def _suffix(self) -> str:
        return f"({self.value})"


@dataclass(frozen=True)
class InstructionSet:
    """One instruction, or two of different kinds, and whether it is given in the short form."""

    instructions: tuple[Instruction, ...]
    short: bool = False

    def __post_init__(self) -> None:
        kinds = [instruction.kind for instruction in self.instructions]
        if not 1 <= len(kinds) <= len(KINDS) or len(set(kinds)) != len(kinds):
            raise ValueError(f"an instruction set holds one instruction per kind, at least one; got {kinds}")

    @classmethod
    def sample(cls, rng: random.Random, characters: Sequence[str], plays: Sequence[str]) -> InstructionSet:
        """A random combination (a character, a play, or both) with random values, short half the time."""
        values = {"character": characters, "play": plays}
        kinds = rng.choice(_COMBINATIONS)
        instructions = tuple(Instruction(kind, rng.choice(values[kind])) for kind in kinds)
        return cls(instructions, short=rng.random() < 0.5)

    def text(self, short: bool | None = None) -> str:
        """All instructions in one form: the set's own unless `short` says which."""
        short = self.short if short is None else short
        return ("; " if short else " ").join(instruction.text(short) for instruction in self.instructions)

    def append_to(self, message: str) -> str:
        """`message` with the instructions appended after a blank line, as Ghost Attention adds them."""
        return f"{message}\n\n{self.text()}"

    def followed_by(self, answer: str) -> bool:
        """Whether `answer` carries every instruction's mark."""
        return all(instruction.followed_by(answer) for instruction in self.instructions)

    def apply(self, answer: str) -> str:
        """`answer` rewritten to follow every instruction; marks already there are not repeated."""
        for instruction in self.instructions:
            answer = instruction.apply(answer)
        return answer


def load_characters_and_plays(path: str | Path = CHARACTERS_AND_PLAYS) -> tuple[list[str], list[str]]:
    """(characters, plays) to sample instructions from, as `scripts/make_demo_data.py` parsed them."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(data["characters"]), list(data["plays"])


def follows_instruction(messages: Sequence[Mapping[str, str]], answer: str) -> float:
    """1.0 when `answer` follows the instructions that the dialog's first user message ends with, in
    `InstructionSet.append_to`'s format (a blank line, then one or two instructions, long or short,
    about the bundled corpus's characters and plays); else 0.0, and 0.0 for a prompt without one.
    A program reward for GRPO: `--config.grpo.reward_fn=llama2_jax.data.instructions:follows_instruction`."""
    user = next((message["content"] for message in messages if message.get("role") == "user"), None)
    instructions = parse_instructions(user) if user else None
    return float(instructions is not None and instructions.followed_by(answer.strip()))


def parse_instructions(message: str) -> InstructionSet | None:
    """The instructions `InstructionSet.append_to` appended to `message`, or None when it ends with none."""
    _, blank, tail = message.rpartition("\n\n")
    if not blank:
        return None
    for short, kinds, pattern in _instruction_patterns():
        found = pattern.fullmatch(tail)
        if found:
            return InstructionSet(tuple(Instruction(kind, found.group(kind)) for kind in kinds), short=short)
    return None


@functools.lru_cache(maxsize=1)
def _instruction_patterns() -> list[tuple[bool, tuple[Kind, ...], re.Pattern]]:
    """(short, kinds in order, pattern) for every text an InstructionSet can have: each form, one
    instruction or two of different kinds in either order, each value one of the bundled characters
    or plays (longest first, so "KING RICHARD" is not read as "KING")."""
    characters, plays = load_characters_and_plays()
    values = {"character": characters, "play": plays}

    def one(kind: Kind, short: bool) -> str:
        names = "|".join(re.escape(value) for value in sorted(set(values[kind]), key=len, reverse=True))
        return re.escape(Instruction(kind, "VALUE").text(short)).replace("VALUE", f"(?P<{kind}>{names})")

    patterns = []
    for short, separator in ((True, "; "), (False, " ")):
        for kinds in (("character",), ("play",), ("character", "play"), ("play", "character")):
            text = re.escape(separator).join(one(kind, short) for kind in kinds)
            patterns.append((short, kinds, re.compile(text)))
    return patterns
