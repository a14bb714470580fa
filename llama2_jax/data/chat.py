"""The Llama 2 chat format, token for token as Meta's reference `chat_completion`.

A dialog is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:

    [system], user, assistant, user, assistant, ..., user [, assistant]

- A leading system message is folded into the first user message as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`.
- Each completed (user, answer) pair is encoded on its own, with BOS and EOS, as
  `[INST] {user.strip()} [/INST] {answer.strip()} `.
- An open user turn at the end is encoded as `[INST] {user.strip()} [/INST]` with BOS only: the prompt
  from which the model writes the next answer.
- Messages containing `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>` are refused (the reference flags them
  as unsafe; here it is an error), so no message can forge a turn boundary.

A dialog that ends with an assistant turn is a training example: `encode_dialog` then also returns a
loss mask that is 1 exactly on the answers' tokens and their EOS — on the answers whose message does
not say `"train": False` (Ghost Attention data trains only the last answer of a dialog).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


class ChatTokenizer(Protocol):
    """What the chat format needs from a tokenizer (`llama2_jax.data.tokenizer.Tokenizer` has it)."""

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...


@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of a dialog; `loss_mask` (same length, 0/1) only when it ends with an assistant turn."""

    tokens: list[int]
    loss_mask: list[int] | None


def validate_dialog(messages: Sequence[Message]) -> None:
    """Raise ValueError naming the problem if `messages` is not a well-formed dialog."""
    if not messages:
        raise ValueError("empty dialog: give at least one user message")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
        found = [tag for tag in SPECIAL_TAGS if tag in content]
        if found:
            raise ValueError(
                f"message {index} ({role}) contains the reserved chat tag(s) {found}; "
                "remove them: they would forge a turn boundary"
            )
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("dialog has a system message but no user message")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = index + (len(messages) - len(turns))
            raise ValueError(
                f"message {position}: expected role {expected!r}, got {message['role']!r}; a dialog is "
                "[system], user, assistant, user, ... with a system message only in first place"
            )


def fold_system_prompt(messages: Sequence[Message]) -> list[Message]:
    """Merge a leading system message into the first user message, as the reference does."""
    if messages[0]["role"] != "system":
        return list(messages)
    system, first_user = messages[0], messages[1]
    merged = {"role": "user", "content": B_SYS + system["content"] + E_SYS + first_user["content"]}
    return [merged, *messages[2:]]


def _prompt_text(user: Message) -> str:
    return f"{B_INST} {user['content'].strip()} {E_INST}"


def _pair_text(user: Message, answer: Message) -> str:
    return f"{_prompt_text(user)} {answer['content'].strip()} "


def _answer_start(tokenizer: ChatTokenizer, user: Message, pair_tokens: list[int]) -> int:
    """Index in `pair_tokens` where the answer begins.

    The pair is tokenized as one string (so ids match the reference exactly); the answer starts after
    the longest common prefix with the prompt's own tokens. SentencePiece pieces never cross the space
    after `[/INST]`, so that prefix is the whole prompt.
    """
    prompt_tokens = tokenizer.encode(_prompt_text(user), bos=True, eos=False)
    start = 0
    while start < min(len(prompt_tokens), len(pair_tokens)) and prompt_tokens[start] == pair_tokens[start]:
        start += 1
    return start


def encode_dialog(tokenizer: ChatTokenizer, messages: Sequence[Message]) -> EncodedDialog:
    """Token ids of `messages` in the Llama 2 chat format (see the module docstring).

    Ending with a user turn gives a generation prompt (`loss_mask` None); ending with an assistant turn
    gives a training example whose mask is 1 on each trained answer's tokens and its EOS, 0 elsewhere.
    """
    validate_dialog(messages)
    dialog = fold_system_prompt(messages)
    tokens: list[int] = []
    loss_mask: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        pair_tokens = tokenizer.encode(_pair_text(user, answer), bos=True, eos=True)
        start = _answer_start(tokenizer, user, pair_tokens)
        tokens += pair_tokens
        trained = int(bool(answer.get("train", True)))
        loss_mask += [0] * start + [trained] * (len(pair_tokens) - start)
    if dialog[-1]["role"] == "assistant":
        return EncodedDialog(tokens=tokens, loss_mask=loss_mask)
    tokens += tokenizer.encode(_prompt_text(dialog[-1]), bos=True, eos=False)
    return EncodedDialog(tokens=tokens, loss_mask=None)


def validate_training_dialog(messages: Sequence[Message]) -> None:
    """Raise ValueError unless `messages` is a dialog to fine-tune on: well formed, ending with an
    answer, no answer empty."""
    validate_dialog(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError("a training dialog must end with an assistant answer (the last turn is "
                         f"{messages[-1]['role']!r}); add the answer or drop the open turn")
    empty = [index for index, message in enumerate(messages)
             if message["role"] == "assistant" and not message["content"].strip()]
    if empty:
        raise ValueError(f"message(s) {empty}: empty assistant answer; drop the dialog or write the answer")


def fit_dialog(
    tokenizer: ChatTokenizer, messages: Sequence[Message], max_tokens: int
) -> tuple[list[Message], list[int]]:
    """Drop the oldest complete (user, assistant) pairs until the prompt fits in `max_tokens`.

    The system message (if any) and the open user turn are always kept. Returns the kept messages and
    their prompt tokens; raises ValueError when even the system prompt plus the last user turn is too long.
    """
    kept = list(messages)
    while True:
        tokens = encode_dialog(tokenizer, kept).tokens
        if len(tokens) <= max_tokens:
            return kept, tokens
        first_turn = 1 if kept[0]["role"] == "system" else 0
        if len(kept) - first_turn <= 1:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens, more than the {max_tokens} allowed even without "
                "earlier turns: shorten the message or the system prompt, or lower --max-new-tokens"
            )
        del kept[first_turn : first_turn + 2]
