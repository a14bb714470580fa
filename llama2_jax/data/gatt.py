"""Ghost Attention (the paper's GAtt): dialogs that teach a model to keep following an instruction
given once, in the first user turn.

Building the data (`python -m llama2_jax gatt`):
  1. take a multi-turn dialog's user turns and draw an instruction (instructions.py: a character,
     a play, or both; half in the short form);
  2. the current policy answers turn after turn with the instruction appended to *every* user
     turn, so that it can see it and follow it (`converse`);
  3. keep the instruction in the first user turn only; each turn becomes an example of its own,
     the dialog up to it, in which every earlier token (assistant answers included) has zero loss
     and only that turn's answer is trained (`training_dialogs`).
  A turn whose answer does not follow the instruction ends the dialog there: the policy's own
  failures are not taught.

Measuring it (`python -m llama2_jax gatt-eval`, the paper's Table 30): the instruction in the first
user turn only, the model answers turn after turn, and at each turn a program checks whether the
answer still follows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from llama2_jax.data.chat import Message, encode_dialog
from llama2_jax.data.instructions import InstructionSet


@dataclasses.dataclass
class Conversation:
    """A dialog being answered turn by turn: its system prompt, its user turns, the instruction, the
    answers so far, and whether the instruction is repeated in every user turn or given only first."""

    system: str | None
    users: list[str]
    instruction: InstructionSet
    every_turn: bool
    answers: list[str] = dataclasses.field(default_factory=list)

    def messages(self, turns: int) -> list[Message]:
        """The dialog up to user turn `turns` (1-based), answered up to the turn before."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in range(turns):
            user = self.users[turn]
            if turn == 0 or self.every_turn:
                user = self.instruction.append_to(user)
            messages.append({"role": "user", "content": user})
            if turn < turns - 1:
                messages.append({"role": "assistant", "content": self.answers[turn]})
        return messages


def split_dialog(messages: Sequence[Message]) -> tuple[str | None, list[str]]:
    """(system prompt, user turns) of a dialog; its answers are not used."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    return system, [message["content"] for message in messages if message["role"] == "user"]


def converse(conversations: Sequence[Conversation], answer: Callable[[list[Conversation], int], list[str]],
             tokenizer, context: int, answer_tokens: int) -> None:
    """Fill each conversation's answers, turn by turn, all conversations of a turn in one call of
    `answer(conversations, turn)` (the model's answers to their `messages(turn)`). A conversation
    stops at its last user turn, or when its next prompt plus an answer would not fit in `context`
    tokens."""
    for turn in range(1, max(len(conversation.users) for conversation in conversations) + 1):
        active = [conversation for conversation in conversations
                  if len(conversation.answers) == turn - 1 and turn <= len(conversation.users)
                  and len(encode_dialog(tokenizer, conversation.messages(turn)).tokens) + answer_tokens <= context]
        if not active:
            return
        for conversation, reply in zip(active, answer(active, turn)):
            conversation.answers.append(reply)


def followed_turns(conversation: Conversation) -> int:
    """How many answers in a row, from the first, follow the instruction."""
    count = 0
    while count < len(conversation.answers) and conversation.instruction.followed_by(conversation.answers[count]):
        count += 1
    return count


def training_dialogs(conversation: Conversation) -> list[list[dict]]:
    """One training dialog per answered turn that followed the instruction (and every turn before
    it did): the instruction in the first user turn only, every answer but the last marked
    `"train": False`."""
    plain = dataclasses.replace(conversation, every_turn=False)
    dialogs = []
    for turn in range(1, followed_turns(conversation) + 1):
        messages = plain.messages(turn) + [{"role": "assistant", "content": conversation.answers[turn - 1]}]
        dialogs.append([{**message, "train": message["role"] == "assistant" and index == len(messages) - 1}
                        for index, message in enumerate(messages)])
    return dialogs


def recall_by_turn(conversations: Sequence[Conversation]) -> dict[int, tuple[int, int]]:
    """{turn: (answers that follow the instruction, answers given)} over the conversations."""
    table: dict[int, tuple[int, int]] = {}
    for conversation in conversations:
        for turn, reply in enumerate(conversation.answers, start=1):
            followed, given = table.get(turn, (0, 0))
            table[turn] = (followed + conversation.instruction.followed_by(reply), given + 1)
    return dict(sorted(table.items()))
