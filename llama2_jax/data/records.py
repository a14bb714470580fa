"""Reading local files into dataset records: text documents, JSONL text, chat dialogs, preference pairs.

Every parser raises `DataError` naming the file and line and the fix; with `skip_bad_lines` the bad
line is counted in a `LineReport` instead, so a build can say how many it dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
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


def text_documents(paths: Sequence[str | os.PathLike], *, document_chars: int = 0,
                   skip_bad_lines: bool = False, report: LineReport | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) for every text file, one document per file, or cut into documents of about
    `document_chars` characters at blank lines when that is > 0."""
    report = report if report is not None else LineReport()
    for file_index, path in enumerate(input_files(paths)):
        text = _read_non_empty_text(path, skip_bad_lines, report)
        if text is None:
            continue
        for piece_index, piece in enumerate(split_at_blank_lines(text, document_chars)):
            report.kept += 1
            yield f"{file_index:06d}-{piece_index:06d}", piece


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
        text = _read_non_empty_text(path, skip_bad_lines, report, named_by)
        if text is None:
            continue
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


def parse_records(paths: Sequence[str | os.PathLike], parse, *, skip_bad_lines: bool = False,
                  report: LineReport | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) for every JSONL line, turned into an example by `parse(record)`; a DataError
    from `parse` gains the file and line, or counts as a skipped line."""
    report = report if report is not None else LineReport()
    file_keys: dict[Path, int] = {}
    for path, line_number, record in jsonl_records(paths, skip_bad_lines=skip_bad_lines, report=report):
        try:
            example = parse(record)
        except DataError as error:
            if skip_bad_lines:
                report.skip(path)
                continue
            raise DataError(f"{path}:{line_number}: {error}") from None
        report.kept += 1
        file_index = file_keys.setdefault(path, len(file_keys))
        yield f"{file_index:06d}-{line_number:09d}", example


def parse_text_record(record: dict[str, Any], text_field: str = "text") -> dict[str, Any]:
    """{"text": str} from a JSONL record holding its text in `text_field`."""
    text = _required(record, text_field, hint="set data.text_field to the field holding the text")
    if not isinstance(text, str) or not text:
        raise DataError(f"field {text_field!r} must be a non-empty string")
    return {"text": text}


def parse_chat_record(record: dict[str, Any]) -> dict[str, Any]:
    """{"messages": [{"role", "content", "train"}, ...]} from `messages` (role/content) or the common
    `conversations` (from/value) shape; roles human/gpt become user/assistant. The dialog must be one
    to fine-tune on (llama2_jax.data.chat.validate_training_dialog); `train` (default true) says
    whether an answer is trained on."""
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        messages = record["conversations"]
    else:
        raise DataError(f"no 'messages' or 'conversations' field (fields: {', '.join(record) or 'none'})")
    messages = _messages(messages)
    try:
        validate_training_dialog(messages)
    except ValueError as error:
        raise DataError(str(error)) from None
    return {"messages": messages}


def parse_prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """A prompt to answer: {"prompt": the dialog up to its last user turn (role/content), "safety": 1
    for a safety prompt, else 0}, from `messages` (a dialog, which may go on past its last user turn:
    a fine-tuning dialog is a prompt too) or `prompt` (a string, one user turn, or a dialog); an
    optional `safety` flag, true or false (absent: a helpfulness prompt)."""
    if "messages" in record:
        messages = _messages(record["messages"])
    elif "prompt" in record:
        prompt = record["prompt"]
        messages = _messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    else:
        raise DataError(f"expected \"prompt\" or \"messages\" (fields: {', '.join(record) or 'none'}); a prompt "
                        "is a string or a dialog")
    try:
        validate_dialog(messages)
    except ValueError as error:
        raise DataError(str(error)) from None
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    safety = record.get("safety", False)
    if not isinstance(safety, bool):
        raise DataError(f"'safety' must be true or false, got {safety!r}")
    return {"prompt": [{"role": message["role"], "content": message["content"]}
                       for message in messages[:last_user + 1]],
            "safety": int(safety)}


def parse_preference_record(record: dict[str, Any]) -> dict[str, Any]:
    """A preference pair: prompt messages, chosen and rejected answers, rating index (-1: unrated)
    and safety labels (1 safe, 0 unsafe, -1 unknown). Accepts `prompt`/`chosen`/`rejected` or the
    Anthropic HH shape (`chosen`/`rejected` transcripts sharing everything but the last answer)."""
    chosen = _required(record, "chosen", hint="a preference pair needs 'chosen' and 'rejected'")
    rejected = _required(record, "rejected", hint="a preference pair needs 'chosen' and 'rejected'")
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = _messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
        prompt = [{"role": message["role"], "content": message["content"]} for message in prompt]
        chosen_answer, rejected_answer = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    else:
        prompt, chosen_answer = _split_hh_transcript(chosen, "chosen")
        rejected_prompt, rejected_answer = _split_hh_transcript(rejected, "rejected")
        if rejected_prompt != prompt:
            raise DataError("'chosen' and 'rejected' transcripts differ before their last answer")
    return {
        "prompt": prompt,
        "chosen": chosen_answer,
        "rejected": rejected_answer,
        "rating": _rating(record.get("rating")),
        "chosen_safe": _safety(record, "chosen_safe"),
        "rejected_safe": _safety(record, "rejected_safe"),
    }


def _read_non_empty_text(path: Path, skip_bad_lines: bool, report: LineReport,
                         named_by: str = DATA_PATHS) -> str | None:
    """The file's text; None for an empty file that is to be skipped (and counted)."""
    text = _read_text(path)
    if text.strip():
        return text
    if skip_bad_lines:
        report.skip(path)
        return None
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


def _messages(messages: Any) -> list[dict[str, str]]:
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


def _answer(answer: Any, field: str) -> str:
    if isinstance(answer, list):  # a dialog ending with the answer
        messages = _messages(answer)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{field!r} is a dialog that does not end with an assistant message")
        return messages[-1]["content"]
    if not isinstance(answer, str):
        raise DataError(f"{field!r} must be a string or a list of messages")
    return answer


def _split_hh_transcript(transcript: Any, field: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(transcript, str):
        raise DataError(f"no 'prompt' field and {field!r} is not a Human/Assistant transcript")
    parts = _HH_TURN.split(transcript)
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
             for speaker, content in zip(parts[1::2], parts[2::2])]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise DataError(f"no 'prompt' field and {field!r} is not a transcript of "
                        "'\\n\\nHuman: ...\\n\\nAssistant: ...' turns ending with the answer")
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
