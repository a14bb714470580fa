"""`python -m llama2_jax chat`: talk to a checkpoint in the terminal, answers streamed as they come.

    python -m llama2_jax chat --checkpoint DIR [--system "You are a pirate."]

Each line read from stdin is a user turn; the answer is printed token by token. A line ending in a
backslash continues the turn on the next line (the backslash dropped, the line break kept), so a
turn can ask a question and quote a line, as the demo dialogs do:

    you> Which play is this line from? \\
    ...> These yellow cowslip cheeks,

Commands: `/system TEXT` sets the system prompt and starts over, `/reset` starts over, `/exit` (or
end of input) quits. Input may be piped, continued lines included:
`printf 'Hi\\nAnd then?\\n' | python -m llama2_jax chat ...`.

The dialog is encoded in the Llama 2 chat format. When it no longer fits the context with room for
`--max-new-tokens`, the oldest (user, answer) pairs are dropped, never the system prompt or the
current message. Sampling defaults to Meta's reference settings: temperature 0.6, top-p 0.9.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO

from llama2_jax.cli import ArgumentParser, UsageError, reports_errors
from llama2_jax.commands.model_flags import add_model_flags, load_for_sampling
from llama2_jax.data.chat import fit_dialog, validate_dialog
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.generate import SamplingParams, decoding_layout, stream


class TextStream:
    """Prints the text of a growing token sequence as it grows.

    Pieces do not map to text one by one (a leading space belongs to the next word, a character
    may span several byte tokens), so the whole answer is decoded each time and only the new suffix
    printed; a trailing incomplete character waits for the byte that completes it.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = ""

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self._show(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        self._show(text)
        self.out.write("\n")
        self.out.flush()
        return text

    def _show(self, text: str) -> None:
        # What is printed cannot be taken back; should decoding ever revise earlier text, the
        # terminal keeps the old prefix and gets the rest from the same offset.
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


class ChatSession:
    """A dialog with the model: history, system prompt and one streamed answer per user turn."""

    def __init__(self, model, tokenizer: Tokenizer, sampling: SamplingParams, max_new_tokens: int,
                 seed: int, system: str | None, out: TextIO):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_new_tokens, self.seed, self.out = max_new_tokens, seed, out
        self.system = system
        self.history: list[dict[str, str]] = []
        self.turns = 0
        # One copy of the weights in the decoding layout, kept for the whole session.
        self.decoding_state = decoding_layout(model)

    def reset(self, system: str | None = None) -> None:
        if system is not None:
            self.system = system
        self.history = []

    def answer(self, user_text: str) -> str:
        """Streams the model's answer to `user_text` and records the exchange."""
        prefix = [{"role": "system", "content": self.system}] if self.system else []
        dialog = prefix + self.history + [{"role": "user", "content": user_text}]
        validate_dialog(dialog)
        budget = self.model.config.max_seq_len - self.max_new_tokens
        kept, prompt = fit_dialog(self.tokenizer, dialog, budget)
        self.history = kept[len(prefix):]
        text_stream = TextStream(self.tokenizer, self.out)
        for token in stream(
            self.model, prompt, max_new_tokens=self.max_new_tokens, eos_id=self.tokenizer.eos_id,
            sampling=self.sampling, seed=self.seed + self.turns, decoding_state=self.decoding_state,
        ):
            text_stream.add(token)
        answer = text_stream.finish()
        self.history.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer


def turns(lines: Iterable[str], on_continue: Callable[[], None] = lambda: None) -> Iterator[str]:
    """The input's lines, each one ending in a backslash joined to the next with the backslash
    dropped and the line break kept: one turn may span several lines. `on_continue` runs when a
    turn goes on to another line (to prompt for it)."""
    pieces: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line.endswith("\\"):
            pieces.append(line[:-1].rstrip())
            on_continue()
            continue
        yield "\n".join([*pieces, line])
        pieces = []
    if pieces:  # the input ended inside a turn: what was typed is still sent
        yield "\n".join(pieces)


def run(session: ChatSession, lines: Iterable[str], out: TextIO, interactive: bool) -> None:
    """The read-answer loop over the turns of `lines` until /exit or the end of input."""

    def prompt(text: str = "\nyou> ") -> None:
        if interactive:
            out.write(text)
            out.flush()

    prompt()
    for turn in turns(lines, on_continue=lambda: prompt("...> ")):
        text = turn.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            out.write("(dialog cleared)\n")
        elif text.startswith("/system"):
            session.reset(system=text[len("/system"):].strip() or None)
            out.write("(system prompt set; dialog cleared)\n")
        elif text:
            if interactive:
                out.write("llama> ")
            try:
                session.answer(text)
            except ValueError as error:
                out.write(f"(refused: {error})\n")
        prompt()


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    parser = ArgumentParser(prog="python -m llama2_jax chat", description=__doc__)
    add_model_flags(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="longest answer, in tokens (default: half the model's context, at most 512)")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_sampling(args)
    context = model.config.max_seq_len
    max_new_tokens = args.max_new_tokens or min(512, context // 2)
    if max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the dialog in the model's "
                         f"context of {context}; lower it")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    session = ChatSession(model, tokenizer, sampling, max_new_tokens, args.seed, args.system, sys.stdout)
    run(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    return 0
