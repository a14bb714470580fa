"""Instructions about Shakespeare's characters and plays that a program can check an answer against.

The Llama 2 paper's Ghost Attention appends an instruction ("Act as Napoleon", "Speak in French", or
both) to the user turns of a dialog, half of them in a terse form ("Figure: Napoleon"), and trains on
answers that keep following it. Judging "acts as Napoleon" needs a person or a model; here each
instruction asks for a visible mark instead, so data can be built by rewriting answers (`apply`) and
a model scored by a plain test (`followed_by`):

- character HAMLET: "Answer as HAMLET, ..." or "Figure: HAMLET"; the answer starts with "HAMLET: ".
- play Hamlet: "End every answer with the play's name, Hamlet." or "Play: Hamlet"; the answer ends
  with "(Hamlet)".

The characters and plays come from the bundled corpus: `scripts/make_demo_data.py` writes the ones it
parsed to `assets/demo/characters_and_plays.json`, read by `load_characters_and_plays`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
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
