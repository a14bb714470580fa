"""tensorflow-datasets builders for local data and the bundled Shakespeare corpus (array_record files).

Builders:  shakespeare            the corpus in llama2_jax/assets, with a held-out `validation` split
           local_text/NAME        text files (one document each, or cut at blank lines), or JSONL or
                                  Parquet records with a text field
           local_chat/NAME        dialogs to fine-tune on (see records.parse_chat_record)
           local_preferences/NAME preference pairs (see records.parse_preference_record)
           local_prompts/NAME     prompts to answer, with a safety flag (see records.parse_prompt_record)
Records are JSON lines or Parquet rows (llama2_jax/data/records.py). A local dataset holds out
`holdout_fraction` of its examples as its `validation` split (at least one, by a stable hash of
each example's place in the files); the bundled datasets come with their own splits.
A dataset prepared in a tfds data_dir by any other means opens by its name (`tfds.builder` reads it
from its files). Building is automatic on first use, takes seconds and is guarded by a file lock, so
processes that start together build once and then read the same files. tfds's own notices about
these builds (a custom configuration, an unprepared folder, "Downloading and preparing dataset
Unknown size") are left out: one line says a dataset is being built.
"""

from __future__ import annotations


import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llama2_jax import storage
from llama2_jax.data import records
from llama2_jax.data.config import DEMO_DATA_DIR
from llama2_jax.data.records import DataError, LineReport

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "shakespeare"
DEFAULT_DATA_DIR = Path("~/.cache/llama2_jax/tensorflow_datasets").expanduser()
FORMATS = ("text", "jsonl", "chat", "preferences", "prompts")
_BUILDER_OF_FORMAT = {"text": "local_text", "jsonl": "local_text", "chat": "local_chat",
                      "preferences": "local_preferences", "prompts": "local_prompts"}


class _QuietTfdsNotices(logging.Filter):
    """Drops tfds's warnings that every local dataset triggers and no user can act on: a custom
    builder config (every local dataset has one), and a version folder without dataset_info.json
    (tfds's answer to whether a dataset not built yet is prepared, asked before each build). Every
    other absl record passes."""

    NOTICES = ("Using custom data configuration: %s", "Variant folder %s has no %s")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.NOTICES


logging.getLogger("absl").addFilter(_QuietTfdsNotices())


@dataclasses.dataclass
class LocalConfig(tfds.core.BuilderConfig):
    """Where a local dataset comes from and how it is cut; stored in the dataset's metadata."""

    paths: tuple[str, ...] = ()
    format: str = "text"  # one of FORMATS
    text_field: str = "text"  # field holding the text ("jsonl" format, and Parquet files of "text")
    document_chars: int = 0  # > 0: cut text files at blank lines into documents of about this size
    holdout_fraction: float = 0.0  # share of examples moved to the `validation` split (at least one)
    skip_bad_lines: bool = False  # skip (and count) malformed lines and empty files instead of failing


def _key_hash(key: str) -> int:
    # A stable hash of an example's key, so the split never changes between builds or machines.
    return zlib.crc32(key.encode()) % 100_000


def held_out_keys(keys: Sequence[str], fraction: float) -> set[str]:
    """The keys of the examples that go to `validation`: those whose hash falls below `fraction`; when
    that is none of two or more examples, the one of lowest hash, so that a small file too has an
    example to evaluate on."""
    if fraction <= 0:
        return set()
    held_out = {key for key in keys if _key_hash(key) < fraction * 100_000}
    if not held_out and len(keys) > 1:
        held_out = {min(keys, key=_key_hash)}
    return held_out


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared split logic: examples of `_examples()` go to train or, by key hash, to validation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _metadata(self) -> tfds.core.MetadataDict:
        return tfds.core.MetadataDict()

    # tfds announces a download of "Unknown size" and its reuse; nothing is downloaded, and `_prepare`
    # says in one line what it builds.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # everything is local
        self._report = LineReport()
        examples = list(self._examples(self._report))
        if self._report.total_skipped:
            print(f"skipped {self._report.total_skipped} bad lines or empty files: {self._report.skipped}")
        if not examples:
            raise DataError(f"dataset {self.name}/{self.builder_config.name} has no examples: "
                            f"the inputs {list(self.builder_config.paths)} hold no usable records")
        self.info.metadata.update(self._build_metadata())
        fraction = self.builder_config.holdout_fraction
        held_out = held_out_keys([key for key, _ in examples], fraction)
        splits = {"train": [example for example in examples if example[0] not in held_out]}
        if fraction > 0:
            splits["validation"] = [example for example in examples if example[0] in held_out]
        for name, split_examples in splits.items():
            if not split_examples:
                raise DataError(f"the {name} split of {self.name} would be empty ({len(examples)} examples, "
                                f"data.holdout_fraction {fraction:g}); add examples, or set data.holdout_fraction=0 "
                                "and train.eval_every=0 to train on all of them without evaluations")
        return {name: iter(split_examples) for name, split_examples in splits.items()}

    def _generate_examples(self, examples: Iterator) -> Iterator:
        yield from examples

    def _build_metadata(self) -> dict[str, Any]:
        config = self.builder_config
        return {"paths": list(config.paths), "format": config.format, "text_field": config.text_field,
                "inputs": inputs_stamp(config.paths), "options": build_options(config),
                "skipped_lines": self._report.total_skipped}

    def _examples(self, report: LineReport) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, example) pairs of this builder's format, bad lines counted in `report`: one record
        per JSON line or Parquet row through the builder's `RECORD_PARSER`, unless the builder reads
        otherwise."""
        yield from records.parse_records(self.builder_config.paths, self.RECORD_PARSER,
                                         skip_bad_lines=self.builder_config.skip_bad_lines, report=report)


class LocalText(_LocalBuilder):
    """Text files (each a document, or cut at blank lines), or records with a text field."""

    BUILDER_CONFIGS = [LocalConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            metadata=self._metadata(), description="Local text documents.")

    def _examples(self, report: LineReport) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        if config.format == "jsonl":
            parse = functools.partial(records.parse_text_record, text_field=config.text_field)
            yield from records.parse_records(config.paths, parse, skip_bad_lines=config.skip_bad_lines,
                                             report=report)
        else:
            for key, text in records.text_documents(config.paths, document_chars=config.document_chars,
                                                    text_field=config.text_field,
                                                    skip_bad_lines=config.skip_bad_lines, report=report):
                yield key, {"text": text}


_MESSAGES = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
# Dialogs to fine-tune on also say which answers are trained on (Ghost Attention trains only the last).
_TRAINING_MESSAGES = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text(),
                                             "train": tfds.features.Scalar(np.int32)})


class LocalChat(_LocalBuilder):
    """Dialogs to fine-tune on, one per record."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Messages say whether they are trained on.", "1.0.0": "First version."}
    BUILDER_CONFIGS = [LocalConfig(name="default", format="chat")]
    RECORD_PARSER = staticmethod(records.parse_chat_record)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"messages": _TRAINING_MESSAGES}),
            metadata=self._metadata(), description="Local chat dialogs.")


class LocalPreferences(_LocalBuilder):
    """Preference pairs with the paper's rating levels and safety labels."""

    BUILDER_CONFIGS = [LocalConfig(name="default", format="preferences")]
    RECORD_PARSER = staticmethod(records.parse_preference_record)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "prompt": _MESSAGES,
                "chosen": tfds.features.Text(),
                "rejected": tfds.features.Text(),
                "rating": tfds.features.Scalar(np.int32, doc=f"index into {records.RATING_LEVELS}, -1 unrated"),
                "chosen_safe": tfds.features.Scalar(np.int32, doc="1 safe, 0 unsafe, -1 unknown"),
                "rejected_safe": tfds.features.Scalar(np.int32, doc="1 safe, 0 unsafe, -1 unknown"),
            }),
            metadata=self._metadata(), description="Local preference pairs.")


class LocalPrompts(_LocalBuilder):
    """Prompts to answer: the dialog up to its last user turn, and whether it is a safety prompt."""

    BUILDER_CONFIGS = [LocalConfig(name="default", format="prompts")]
    RECORD_PARSER = staticmethod(records.parse_prompt_record)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "prompt": _MESSAGES,
                "safety": tfds.features.Scalar(np.int32, doc="1 a safety prompt, 0 a helpfulness prompt"),
            }),
            metadata=self._metadata(), description="Local prompts.")


def build_options(config: LocalConfig) -> dict[str, Any]:
    """What a local dataset's examples and splits depend on besides its files."""
    return {"text_field": config.text_field, "document_chars": config.document_chars,
            "holdout_fraction": config.holdout_fraction, "skip_bad_lines": config.skip_bad_lines}


def inputs_stamp(paths: Sequence[str]) -> str:
    """Every input file's path, size and modification time, checksummed: whether a local dataset's
    files changed since it was built."""
    files = records.input_files(paths)
    return f"{zlib.crc32(repr([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()):08x}"


def _fingerprint(paths: Sequence[Path]) -> str:
    """A short checksum of files' contents. Bundled datasets are built once into the tfds cache under
    a config name carrying it, so a package whose bundled files changed builds them anew."""
    checksum = 0
    for path in sorted(paths):
        checksum = zlib.crc32(path.read_bytes(), checksum)
    return f"{checksum:08x}"


class Shakespeare(LocalText):
    """The bundled corpus: 42 plays and poems cut at blank lines into ~16k-character documents
    (335 of them, so shuffling mixes plays), 5 % held out as `validation`."""

    BUILDER_CONFIGS = [LocalConfig(name=f"documents_{_fingerprint(list(BUNDLED_CORPUS.iterdir()))}",
                                   paths=(str(BUNDLED_CORPUS),), document_chars=16_000, holdout_fraction=0.05)]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            metadata=self._metadata(), homepage="https://www.gutenberg.org/",
            description="Shakespeare's plays and poems (Project Gutenberg, public domain).")

    def _build_metadata(self) -> dict[str, Any]:
        return {"skipped_lines": 0}  # the corpus path is machine specific; nothing to compare


class _BundledSplits:
    """A bundled demo dataset whose splits are files of their own (llama2_jax/assets/demo)."""

    SPLIT_FILES: dict[str, str] = {}

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # everything is bundled
        self._report = LineReport()
        self.info.metadata.update(self._build_metadata())
        return {split: iter(list(records.parse_records([DEMO_DATA_DIR / name], self.RECORD_PARSER,
                                                       report=self._report)))
                for split, name in self.SPLIT_FILES.items()}

    def _build_metadata(self) -> dict[str, Any]:
        return {"skipped_lines": 0}  # the bundled path is machine specific; nothing to compare


def _demo_config(format: str, split_files: dict[str, str]) -> LocalConfig:
    return LocalConfig(name=f"demo_{_fingerprint([DEMO_DATA_DIR / name for name in split_files.values()])}",
                       format=format)


class ShakespeareDialogs(_BundledSplits, LocalChat):
    """Demo dialogs about the corpus's lines, speakers and plays, to fine-tune on."""

    SPLIT_FILES = {"train": "dialogs_train.jsonl", "validation": "dialogs_validation.jsonl"}
    BUILDER_CONFIGS = [_demo_config("chat", SPLIT_FILES)]


class ShakespeareHelpfulness(_BundledSplits, LocalPreferences):
    """Demo preference pairs for the helpfulness reward model: the true answer against a wrong one,
    four rating levels, safety labels."""

    SPLIT_FILES = {"train": "helpfulness_pairs_train.jsonl", "validation": "helpfulness_pairs_validation.jsonl"}
    BUILDER_CONFIGS = [_demo_config("preferences", SPLIT_FILES)]


class ShakespeareSafety(_BundledSplits, LocalPreferences):
    """Demo preference pairs for the safety reward model: a safe reply against an unsafe answer."""

    SPLIT_FILES = {"train": "safety_pairs_train.jsonl", "validation": "safety_pairs_validation.jsonl"}
    BUILDER_CONFIGS = [_demo_config("preferences", SPLIT_FILES)]


class ShakespearePrompts(_BundledSplits, LocalPrompts):
    """Demo prompts for rejection sampling: the prompts of the helpfulness and safety pairs, flagged."""

    SPLIT_FILES = {"train": "prompts_train.jsonl", "validation": "prompts_validation.jsonl"}
    BUILDER_CONFIGS = [_demo_config("prompts", SPLIT_FILES)]


class ShakespeareInstructionPrompts(_BundledSplits, LocalPrompts):
    """The demo prompts, each with a Ghost Attention instruction appended (scripts/make_instruction_prompts.py):
    what a program reward (llama2_jax.data.instructions:follows_instruction) can check answers against."""

    SPLIT_FILES = {"train": "instruction_prompts_train.jsonl", "validation": "instruction_prompts_validation.jsonl"}
    BUILDER_CONFIGS = [_demo_config("prompts", SPLIT_FILES)]


_BUILDER_CLASSES = {"local_text": LocalText, "local_chat": LocalChat, "local_preferences": LocalPreferences,
                    "local_prompts": LocalPrompts}
# Datasets bundled with the package, built on first use (llama2_jax/assets/demo/README.md).
BUNDLED = {"shakespeare": Shakespeare, "shakespeare_dialogs": ShakespeareDialogs,
           "shakespeare_helpfulness": ShakespeareHelpfulness, "shakespeare_safety": ShakespeareSafety,
           "shakespeare_prompts": ShakespearePrompts, "shakespeare_instruction_prompts": ShakespeareInstructionPrompts}


@contextlib.contextmanager
def build_lock(data_dir: Path | epath.Path) -> Iterator[None]:
    """Exclusive file lock in `data_dir`, so that processes starting together build a dataset once.
    A bucket holds no locks, so datasets are built in a local data_dir and copied to a bucket."""
    if storage.is_url(data_dir):
        raise DataError(f"a dataset is built in a local data_dir, not in {os.fspath(data_dir)}: build it with "
                        "`python -m llama2_jax data build --data-dir DIR ...` (or a run with a local data.data_dir), "
                        f"then copy it there: gcloud storage cp -r 'DIR/*' {os.fspath(data_dir)}")
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".llama2_jax_build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_local_dataset(name: str, paths: Sequence[str | os.PathLike], *, format: str = "text",
                        data_dir: str | os.PathLike | None = None, text_field: str = "text",
                        document_chars: int = 0, holdout_fraction: float = 0.0,
                        skip_bad_lines: bool = False) -> tfds.core.DatasetBuilder:
    """Builds (once) local files into the tfds dataset `<builder>/<name>` and returns its builder.

    A dataset of that name built from other paths or another format is an error, not a silent
    reuse; one whose files changed since it was built (size or modification time), or that was
    built with other options (a holdout fraction, a text field, ...), is built again.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data.format {format!r}; choose one of {', '.join(FORMATS)}")
    absolute_paths = tuple(str(Path(path).expanduser().resolve()) for path in paths)
    records.input_files(absolute_paths)  # fail early, before any lock, on missing inputs
    config = LocalConfig(name=name, paths=absolute_paths, format=format, text_field=text_field,
                         document_chars=document_chars, holdout_fraction=holdout_fraction,
                         skip_bad_lines=skip_bad_lines)
    builder_class = _BUILDER_CLASSES[_BUILDER_OF_FORMAT[format]]

    def inputs_changed(builder) -> bool:
        stored = dict(builder.info.metadata or {})
        return stored.get("paths") == list(absolute_paths) and (
            stored.get("inputs") != inputs_stamp(absolute_paths) or stored.get("options") != build_options(config))

    builder = _prepare(builder_class, config, data_dir, inputs_changed)
    stored = dict(builder.info.metadata or {})
    if stored.get("paths") != list(absolute_paths) or stored.get("format") != format:
        raise DataError(f"dataset {builder.name}/{name} in {builder.data_dir} was built from "
                        f"{stored.get('paths')} ({stored.get('format')}); choose another data.dataset name "
                        "or delete that directory to rebuild it")
    return builder


def bundled_dataset(name: str = "shakespeare", data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """A bundled dataset (BUNDLED), built on first use."""
    return _prepare(BUNDLED[name], None, data_dir)


def _prepare(builder_class: type, config: LocalConfig | None, data_dir: str | os.PathLike | None,
             is_stale: Callable[[Any], bool] = lambda builder: False) -> tfds.core.DatasetBuilder:
    """The builder, built first if it is not prepared or `is_stale`, under the data_dir's lock."""
    data_dir = storage.as_path(data_dir or DEFAULT_DATA_DIR)

    def open_builder():
        return builder_class(config=config, data_dir=os.fspath(data_dir), file_format="array_record")

    builder = open_builder()
    if not builder.is_prepared() or is_stale(builder):
        with build_lock(data_dir):
            builder = open_builder()  # another process may have built it while we waited
            if builder.is_prepared() and is_stale(builder):
                print(f"the files or options of dataset {builder.name}/{builder.builder_config.name} changed "
                      "since it was built: building it again")
                shutil.rmtree(builder.data_dir, ignore_errors=True)
                builder = open_builder()
            if not builder.is_prepared():
                print(f"building dataset {builder.name}/{builder.builder_config.name} in {data_dir}", flush=True)
                tfds.display_progress_bar(False)
                builder.download_and_prepare()
    return builder


def prepared_dataset(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The builder of dataset `name` already prepared in `data_dir`: a bundled one (built if needed),
    a local dataset by its bare name ("mycorpus") or in full ("local_text/mycorpus"), or any tfds
    dataset prepared there ("some_tfds_name/config:1.0.0")."""
    if not name:  # the paper's sizes leave the data to the user
        raise DataError("data.dataset is empty: name a dataset prepared in data.data_dir (`python -m llama2_jax data "
                        "build`), or set data.paths to files of yours and data.dataset to a name for them")
    if name in BUNDLED:
        return bundled_dataset(name, data_dir)
    data_dir = storage.as_path(data_dir or DEFAULT_DATA_DIR)
    if "/" not in name:
        local = [builder for builder in _BUILDER_CLASSES if (data_dir / builder / name).is_dir()]
        if len(local) > 1:
            raise DataError(f"{name!r} names several local datasets in {data_dir} ({', '.join(local)}); "
                            f"give the full name, e.g. {local[0]}/{name}")
        if local:
            name = f"{local[0]}/{name}"
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
        prepared = builder.is_prepared()
    except Exception:  # tfds raises several types (and lists its whole catalogue) for an unknown name
        prepared = False
    if not prepared:
        raise DataError(f"dataset {name!r} is not prepared in {data_dir}; build it with "
                        "`python -m llama2_jax data build --name NAME --input FILES`, or set data.paths "
                        "to build it on first use, or data.data_dir to where it is")
    return builder


def open_builder(data_config, kind: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder the `data` config section names: local files (built on first use) or a prepared dataset.
    With the `kind` of data the caller reads, local files of another format are refused before any build."""
    if data_config.paths:
        if kind is not None:
            check_format(data_config.format, kind)
        builder = build_local_dataset(
            data_config.dataset, list(data_config.paths), format=data_config.format,
            data_dir=data_config.data_dir or None, text_field=data_config.text_field,
            document_chars=data_config.document_chars, holdout_fraction=data_config.holdout_fraction,
            skip_bad_lines=data_config.skip_bad_lines)
        _say_held_out(builder, data_config.holdout_fraction)
        return builder
    return prepared_dataset(data_config.dataset, data_config.data_dir or None)


# The local datasets whose held-out share this process has told: a run opens its dataset several times.
_HELD_OUT_TOLD: set[str] = set()


def _say_held_out(builder: tfds.core.DatasetBuilder, fraction: float) -> None:
    """One line: how many examples of data.paths are held out for evaluations, and how not to."""
    if fraction <= 0 or builder.data_dir in _HELD_OUT_TOLD:
        return
    _HELD_OUT_TOLD.add(builder.data_dir)
    splits = builder.info.splits
    total = sum(split.num_examples for split in splits.values())
    print(f"held out {splits['validation'].num_examples} of the {total} examples of data.paths as the validation "
          f"split (data.holdout_fraction {fraction:g}, at least one; 0 holds out none)")


def check_local_split(data_config, split: str) -> None:
    """Before data.paths are built: a DataError when `split` is none of the splits they are built into."""
    splits = ("train", "validation") if data_config.holdout_fraction > 0 else ("train",)
    if data_config.paths and split not in splits:
        raise missing_split(data_config, split, splits)


def missing_split(data_config, split: str, splits: Sequence[str]) -> DataError:
    """The error for a dataset that has only `splits`, not `split`, naming the setting that fixes it."""
    lacks = f"dataset {data_config.dataset} has no split {split!r} (it has {', '.join(splits)})"
    if split != data_config.eval_split:
        return DataError(f"{lacks}; set data.train_split to one of them")
    if data_config.paths and split == "validation":
        fix = "hold some examples of data.paths out as it with data.holdout_fraction (e.g. 0.05)"
    elif data_config.paths:
        fix = "the held-out split of data.paths is `validation`: set data.eval_split=validation"
    else:
        fix = ("build the dataset with one (`python -m llama2_jax data build ... --holdout-fraction 0.05`, or "
               "data.paths with data.holdout_fraction), or set data.eval_split to a split it has")
    return DataError(f"{lacks}, which evaluations read (data.eval_split): {fix}; or turn evaluations off: "
                     "train.eval_every=0, and eval_prompts=0 in a stage that answers held-out prompts")


# The feature that tells a dataset's kind, and the command that trains on that kind.
KINDS = {"text": ("text", "train"), "chat": ("messages", "sft"), "preferences": ("chosen", "reward"),
         "prompts": ("safety", "rejection")}
# The kind of dataset local files of each data.format become.
_KIND_OF_FORMAT = {"text": "text", "jsonl": "text", "chat": "chat", "preferences": "preferences", "prompts": "prompts"}


def check_format(format: str, kind: str) -> None:
    """A DataError naming the right command when local files of `format` are not the `kind` a stage reads."""
    found = _KIND_OF_FORMAT.get(format)
    if found in (None, kind):
        return  # an unknown format is build_local_dataset's error
    formats = " or ".join(name for name, format_kind in _KIND_OF_FORMAT.items() if format_kind == kind)
    raise DataError(f"data.format={format}: data.paths hold {found} data, but this stage reads {kind} data "
                    f"(data.format {formats}); train on {found} data with `python -m llama2_jax {KINDS[found][1]}`")


def dataset_kind(builder: tfds.core.DatasetBuilder) -> str | None:
    features = builder.info.features
    return next((kind for kind, (feature, _) in KINDS.items() if feature in features), None)


def check_kind(builder: tfds.core.DatasetBuilder, kind: str) -> None:
    """A DataError naming the right command when a stage is given another kind of dataset."""
    found = dataset_kind(builder)
    if found == kind:
        return
    name = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}".rstrip("/")
    if found is None:
        raise DataError(f"dataset {name} has none of the features {', '.join(f for f, _ in KINDS.values())}; "
                        f"this stage reads {kind} data")
    raise DataError(f"dataset {name} holds {found} data, but this stage reads {kind} data; train on it "
                    f"with `python -m llama2_jax {KINDS[found][1]}`")


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """Random-access source of the examples of `split`, refusing a missing or empty split."""
    splits = builder.info.splits
    if split not in splits:
        raise DataError(f"dataset {builder.name} has no split {split!r} (it has {', '.join(splits)}); "
                        "set data.train_split / data.eval_split")
    if splits[split].num_examples == 0:
        raise DataError(f"split {split!r} of dataset {builder.name} is empty")
    return builder.as_data_source(split=split)


def describe(builder: tfds.core.DatasetBuilder) -> str:
    """A short human-readable summary: name, location, splits and sizes, metadata."""
    lines = [f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''} "
             f"at {builder.data_dir}"]
    lines += [f"  {name}: {info.num_examples} examples, {info.num_bytes}"
              for name, info in builder.info.splits.items()]
    if builder.info.metadata:
        lines.append(f"  metadata: {json.dumps(dict(builder.info.metadata))}")
    return "\n".join(lines)
