"""Reading local files into dataset records: text documents, text records, chat dialogs, preference
pairs, prompts.

A file is plain text, JSON lines, or Parquet (a `.parquet` file, what Hub datasets ship: a row is a
record, with the same fields a JSON line would have; a null is a field the row does not have).
Each record kind has one parser, which takes every shape of it people have:

    chat         {"messages": [{"role", "content"}, ...]}; {"conversations": [{"from", "value"}, ...]}
                 (ShareGPT); {"prompt", "completion"} (trl: each a string or a list of messages)
    preferences  {"prompt", "chosen", "rejected"} (the prompt a string or messages; each answer a
                 string, messages ending with it, or the whole conversation, prompt included, as
                 UltraFeedback has it); {"chosen", "rejected"} alone: whole conversations sharing
                 all but the last answer (Anthropic HH transcripts, or lists of messages)
    prompts      {"prompt": a string or messages}; {"messages"} or {"conversations"}: a dialog,
                 cut after its last user turn
    text         {text_field: a string}

Every parser raises `DataError` naming the file and line (a Parquet file's row, from 1), the problem,
and one valid record of the kind it reads; with `skip_bad_lines` the bad record is counted in a
`LineReport` instead, so a build can say how many it dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llama2_jax.data.chat import validate_dialog, validate_training_dialog
from llama2_jax.data.tokenizer import expand_text_files

# The paper's four preference levels, strongest first; a record's `rating` is an index into this.
RATING_LEVELS = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")
UNRATED = -1
UNKNOWN_SAFETY = -1
_RATING_ALIASES = {
    **{level: index for index, level in enumerate(RATING_LEVELS)},
    "negligibly_better": 3, "unsure": 3, "negligibly_better_unsure": 3,
}
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                 "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_PARQUET_BATCH_ROWS = 1024  # rows read into memory at once

# One valid record of each kind, shown in the error about a record of the wrong shape.
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
PREFERENCE_EXAMPLE = {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "What?"}
PROMPT_EXAMPLE = {"prompt": "Hi"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line and the fix."""


@dataclasses.dataclass
class LineReport:
    """Counts of what a read kept and skipped, per file."""

    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, path: Path) -> None:
        self.skipped[str(path)] = self.skipped.get(str(path), 0) + 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# What names a dataset's files. A command that reads files of its own passes its flag as `named_by`,
# so an error sends the user to that flag, without data.skip_bad_lines, which only datasets have.
DATA_PATHS = "data.paths"


def input_files(paths: Sequence[str | os.PathLike], named_by: str = DATA_PATHS) -> list[Path]:
    """Files named by `paths` (directories expanded), or a DataError when there are none."""
    if not paths:
        raise DataError(f"no input files given; set {named_by} (files or directories)")
    try:
        return expand_text_files(paths)
    except FileNotFoundError as error:
        raise DataError(f"{error}; check {named_by}") from error


def text_documents(paths: Sequence[str | os.PathLike], *, document_chars: int = 0, text_field: str = "text",
                   skip_bad_lines: bool = False, report: LineReport | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) for every text file, one document per file, and every row of a Parquet file (its
    `text_field` column); each cut into documents of about `document_chars` characters at blank
    lines when that is > 0."""
    report = report if report is not None else LineReport()
    for file_index, path in enumerate(input_files(paths)):
        if path.suffix == ".parquet":
            parse = functools.partial(parse_text_record, text_field=text_field)
            rows = _parquet_rows(path, skip_bad_lines, report, DATA_PATHS)
            documents = ((f"{row:09d}-", example["text"])
                         for _, row, example in _parsed(rows, parse, skip_bad_lines, report))
        else:  # a text file's pieces keep the keys they always had: the held-out split hashes them
            text = _read_non_empty_text(path, skip_bad_lines, report)
            documents = [] if text is None else [("", text)]
        for document_key, document in documents:
            for piece_index, piece in enumerate(split_at_blank_lines(document, document_chars)):
                report.kept += 1
                yield f"{file_index:06d}-{document_key}{piece_index:06d}", piece


def split_at_blank_lines(text: str, document_chars: int) -> list[str]:
    """`text` cut at blank lines into pieces of at least `document_chars` characters (the last may be
    shorter); the pieces concatenate back to `text`. `document_chars` <= 0 keeps the text whole."""
    if document_chars <= 0 or len(text) <= document_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + document_chars)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def jsonl_records(paths: Sequence[str | os.PathLike], *, skip_bad_lines: bool = False,
                  report: LineReport | None = None,
                  named_by: str = DATA_PATHS) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, line number, parsed object) for every non-blank line of the JSONL files."""
    report = report if report is not None else LineReport()
    for path in input_files(paths, named_by):
        yield from _jsonl_lines(path, skip_bad_lines, report, named_by)


def file_records(paths: Sequence[str | os.PathLike], *, skip_bad_lines: bool = False,
                 report: LineReport | None = None) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, number, record) for every record of the files: a Parquet file's rows, numbered from 1,
    and the other files' JSON lines."""
    report = report if report is not None else LineReport()
    for path in input_files(paths):
        if path.suffix == ".parquet":
            yield from _parquet_rows(path, skip_bad_lines, report, DATA_PATHS)
        else:
            yield from _jsonl_lines(path, skip_bad_lines, report, DATA_PATHS)


def parse_records(paths: Sequence[str | os.PathLike], parse, *, skip_bad_lines: bool = False,
                  report: LineReport | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) for every record of the files (`file_records`), turned into an example by
    `parse(record)`; a DataError from `parse` gains the file and line, or counts as a skipped line."""
    report = report if report is not None else LineReport()
    file_keys: dict[Path, int] = {}
    records = file_records(paths, skip_bad_lines=skip_bad_lines, report=report)
    for path, number, example in _parsed(records, parse, skip_bad_lines, report):
        report.kept += 1
        file_index = file_keys.setdefault(path, len(file_keys))
        yield f"{file_index:06d}-{number:09d}", example


def parse_text_record(record: dict[str, Any], text_field: str = "text") -> dict[str, Any]:
    """{"text": str} from a record holding its text in `text_field`."""
    example = f"; expected a record like {json.dumps({text_field: 'Once upon a time.'})}"
    if text_field not in record:
        raise DataError(f"missing field {text_field!r} (fields: {', '.join(record) or 'none'}); set "
                        f"data.text_field to the field holding the text{example}")
    text = record[text_field]
    if not isinstance(text, str) or not text:
        raise DataError(f"field {text_field!r} must be a non-empty string{example}")
    return {"text": text}


def _shows_example(example: dict[str, Any]) -> Callable:
    """A parser whose DataError ends with `example`, one valid record of the kind it reads: the
    shape to turn a bad record into."""

    def decorate(parse: Callable) -> Callable:
        @functools.wraps(parse)
        def parse_or_show_example(record: dict[str, Any]) -> dict[str, Any]:
            try:
                return parse(record)
            except DataError as error:
                raise DataError(f"{error}; expected a record like {json.dumps(example)}") from None

        return parse_or_show_example

    return decorate


@_shows_example(CHAT_EXAMPLE)
def parse_chat_record(record: dict[str, Any]) -> dict[str, Any]:
    """{"messages": [{"role", "content", "train"}, ...]} from `messages` (role/content),
    `conversations` (ShareGPT's from/value; roles human/gpt become user/assistant) or trl's
    `prompt` and `completion` (each a string, one user turn and one answer, or a list of messages),
    where only the completion's answers are trained on. The dialog must be one to fine-tune on
    (llama2_jax.data.chat.validate_training_dialog); a message's `train` (default true) says
    whether that answer is trained on."""
    if "messages" in record or "conversations" in record:
        messages = _dialog(record)
    elif "prompt" in record and "completion" in record:
        prompt = [dict(message, train=False) if message["role"] == "assistant" else message
                  for message in _turns(record["prompt"], "user", "prompt")]
        messages = [*prompt, *_turns(record["completion"], "assistant", "completion")]
    else:
        raise DataError(f"no 'messages', 'conversations', or 'prompt' and 'completion' field "
                        f"(fields: {', '.join(record) or 'none'})")
    try:
        validate_training_dialog(messages)
    except ValueError as error:
        raise DataError(str(error)) from None
    return {"messages": messages}


@_shows_example(PROMPT_EXAMPLE)
def parse_prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """A prompt to answer: {"prompt": the dialog up to its last user turn (role/content), "safety": 1
    for a safety prompt, else 0}, from `messages` or `conversations` (a dialog, which may go on past
    its last user turn: a fine-tuning dialog is a prompt too) or `prompt` (a string, one user turn, or
    a list of messages: a chat or preference record's prompt); an optional `safety` flag, true or
    false (absent: a helpfulness prompt)."""
    if "messages" in record or "conversations" in record:
        messages = _dialog(record)
    elif "prompt" in record:
        messages = _turns(record["prompt"], "user", "prompt")
    else:
        raise DataError(f"no 'prompt', 'messages' or 'conversations' field (fields: {', '.join(record) or 'none'}); "
                        "a prompt is a string or a list of messages")
    try:
        validate_dialog(messages)
    except ValueError as error:
        raise DataError(str(error)) from None
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    safety = record.get("safety", False)
    if not isinstance(safety, bool):
        raise DataError(f"'safety' must be true or false, got {safety!r}")
    return {"prompt": _plain(messages[:last_user + 1]), "safety": int(safety)}


@_shows_example(PREFERENCE_EXAMPLE)
def parse_preference_record(record: dict[str, Any]) -> dict[str, Any]:
    """A preference pair: prompt messages, chosen and rejected answers, rating index (-1: unrated)
    and safety labels (1 safe, 0 unsafe, -1 unknown).

    With a `prompt` (a string or a list of messages), `chosen` and `rejected` are each the answer (a
    string), a list of messages ending with it (trl: the one assistant message), or the whole
    conversation, the prompt's turns and then the answer (UltraFeedback). Without one they are whole
    conversations sharing everything but the last answer: Anthropic HH transcripts
    ("\\n\\nHuman: ...\\n\\nAssistant: ...") or lists of messages (trl's implicit prompt)."""
    chosen = _required(record, "chosen", hint="a preference pair needs 'chosen' and 'rejected'")
    rejected = _required(record, "rejected", hint="a preference pair needs 'chosen' and 'rejected'")
    if "prompt" in record:
        prompt = _plain(_turns(record["prompt"], "user", "prompt"))
        chosen_answer, rejected_answer = _answer(chosen, "chosen", prompt), _answer(rejected, "rejected", prompt)
    else:
        prompt, chosen_answer = _split_conversation(chosen, "chosen")
        rejected_prompt, rejected_answer = _split_conversation(rejected, "rejected")
        if rejected_prompt != prompt:
            raise DataError("'chosen' and 'rejected' conversations differ before their last answer")
    return {
        "prompt": prompt,
        "chosen": chosen_answer,
        "rejected": rejected_answer,
        "rating": _rating(record.get("rating")),
        "chosen_safe": _safety(record, "chosen_safe"),
        "rejected_safe": _safety(record, "rejected_safe"),
    }


def _jsonl_lines(path: Path, skip_bad_lines: bool, report: LineReport,
                 named_by: str) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    text = _read_non_empty_text(path, skip_bad_lines, report, named_by)
    if text is None:
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as error:
            if skip_bad_lines:
                report.skip(path)
                continue
            skip_hint = " or set data.skip_bad_lines to skip such lines" if named_by == DATA_PATHS else ""
            raise DataError(f"{path}:{line_number}: malformed JSON line ({error}); fix it{skip_hint}") from None
        yield path, line_number, record


def _parquet_rows(path: Path, skip_bad_lines: bool, report: LineReport,
                  named_by: str) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    import pyarrow.parquet  # loaded only when a Parquet file is read: it takes a noticeable while

    try:
        rows = pyarrow.parquet.ParquetFile(path)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a Parquet file ({error}); convert it or remove it from {named_by}") from None
    if rows.metadata.num_rows == 0:
        _refuse_empty_file(path, skip_bad_lines, report, named_by)
        return
    row_number = 0
    for batch in rows.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            row_number += 1
            yield path, row_number, _without_nulls(row)


def _without_nulls(value: Any) -> Any:
    """A Parquet row as a JSON line would have it: a struct lists every field of its column, and a
    field a record lacks is null there."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _parsed(records: Iterator[tuple[Path, int, dict[str, Any]]], parse, skip_bad_lines: bool,
            report: LineReport) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, number, parse(record)) for each record; a DataError from `parse` gains the file and
    number, or counts as a skipped line."""
    for path, number, record in records:
        try:
            example = parse(record)
        except DataError as error:
            if skip_bad_lines:
                report.skip(path)
                continue
            raise DataError(f"{path}:{number}: {error}") from None
        yield path, number, example


def _read_non_empty_text(path: Path, skip_bad_lines: bool, report: LineReport,
                         named_by: str = DATA_PATHS) -> str | None:
    """The file's text; None for an empty file that is to be skipped (and counted)."""
    text = _read_text(path)
    if text.strip():
        return text
    _refuse_empty_file(path, skip_bad_lines, report, named_by)
    return None


def _refuse_empty_file(path: Path, skip_bad_lines: bool, report: LineReport, named_by: str) -> None:
    """Counts an empty file as skipped, or (without skip_bad_lines) raises a DataError."""
    if skip_bad_lines:
        report.skip(path)
        return
    skip_hint = " or set data.skip_bad_lines" if named_by == DATA_PATHS else ""
    raise DataError(f"{path}: file is empty; remove it from {named_by}{skip_hint}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); convert it to UTF-8") from None


def _required(record: dict[str, Any], field: str, *, hint: str) -> Any:
    if field not in record:
        raise DataError(f"missing field {field!r} (fields: {', '.join(record) or 'none'}); {hint}")
    return record[field]


def _dialog(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages of a record's `messages` or (ShareGPT) `conversations`."""
    return _messages(record["messages"] if "messages" in record else record["conversations"])


def _turns(value: Any, role: str, field: str) -> list[dict[str, Any]]:
    """A field that is a string (one message of `role`) or a list of messages."""
    if isinstance(value, str):
        return _messages([{"role": role, "content": value}])
    if not isinstance(value, list):
        raise DataError(f"{field!r} must be a string or a list of messages, got {value!r}")
    return _messages(value)


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("a dialog must be a non-empty list of messages")
    result = []
    for message in messages:
        if not isinstance(message, dict):
            raise DataError(f"a message must be an object, got {message!r}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise DataError(f"a message needs 'role' and 'content' (or 'from' and 'value'): {message!r}")
        if str(role).lower() not in _ROLE_ALIASES:
            raise DataError(f"unknown role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"message content must be a string, got {content!r}")
        train = message.get("train", True)
        if not isinstance(train, bool):
            raise DataError(f"a message's 'train' must be true or false, got {train!r}")
        result.append({"role": _ROLE_ALIASES[str(role).lower()], "content": content, "train": train})
    return result


def _plain(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as a prompt holds them: role and content."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _answer(answer: Any, field: str, prompt: list[dict[str, str]]) -> str:
    """The answer of a pair with a `prompt`: a string, or messages ending with it, whatever comes
    before it the prompt's own turns."""
    if isinstance(answer, str):
        return answer
    if not isinstance(answer, list):
        raise DataError(f"{field!r} must be a string or a list of messages, got {answer!r}")
    messages = _plain(_messages(answer))
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{field!r} is a list of messages that does not end with an assistant message")
    if messages[:-1] and _stripped(messages[:-1]) != _stripped(prompt):
        raise DataError(f"{field!r} holds turns before its answer that are not the prompt's; give the answer "
                        "alone, or the whole conversation starting with the prompt")
    return messages[-1]["content"]


def _stripped(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    # The chat format strips every message, so surrounding whitespace tells no two turns apart.
    return [(message["role"], message["content"].strip()) for message in messages]


def _split_conversation(conversation: Any, field: str) -> tuple[list[dict[str, str]], str]:
    """(prompt, answer) of a whole conversation ending with the answer: an Anthropic HH transcript
    or a list of messages."""
    if isinstance(conversation, str):
        parts = _HH_TURN.split("\n\n" + conversation.lstrip())
        turns = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                 for speaker, content in zip(parts[1::2], parts[2::2])]
    elif isinstance(conversation, list):
        turns = _plain(_messages(conversation))
    else:
        raise DataError(f"{field!r} must be a string or a list of messages, got {conversation!r}")
    if not any(turn["role"] == "user" for turn in turns[:-1]) or turns[-1]["role"] != "assistant":
        raise DataError(f"no 'prompt' field, and {field!r} is not a whole conversation ending with the answer: "
                        "a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript or a list of messages")
    return turns[:-1], turns[-1]["content"]


def _rating(rating: Any) -> int:
    if rating is None:
        return UNRATED
    if isinstance(rating, int) and not isinstance(rating, bool) and 0 <= rating < len(RATING_LEVELS):
        return rating
    if isinstance(rating, str):
        key = re.sub(r"[^a-z]+", "_", rating.lower()).strip("_")
        if key in _RATING_ALIASES:
            return _RATING_ALIASES[key]
    raise DataError(f"rating {rating!r} is not one of the four levels {', '.join(RATING_LEVELS)} "
                    f"(or their index 0-{len(RATING_LEVELS) - 1})")


def _safety(record: dict[str, Any], field: str) -> int:
    value = record.get(field)
    if value is None:
        return UNKNOWN_SAFETY
    if not isinstance(value, bool):
        raise DataError(f"{field!r} must be true or false, got {value!r}")
    return int(value)
