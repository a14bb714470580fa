"""The recipe's stages in the paper's order: what each runs, on what, from which earlier stage.

A step is one or more commands of `python -m llama2_jax`, each exactly what a user would type: a
stage (`sft`, `reward`, ...) on its config section of the pipeline's config, or a command (`gatt`,
`distill`, `eval`, ...) on flags from its section. A stage's paths to earlier stages'
outputs are filled here only where its section leaves them empty, so a section may point a stage at
something else (Meta's weights, reward models trained elsewhere) and the stage then needs nothing
from the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable

import ml_collections

from llama2_jax import config_cli, storage, stages


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One command: a stage run on `config` in `workdir` (its config read from `config_file`, and
    changed from it as the flags of `command_line` say), or a command run on `argv`."""

    command: str
    argv: tuple[str, ...] = ()
    config: ml_collections.ConfigDict | None = None
    config_file: str = ""
    workdir: str = ""

    def command_line(self) -> str:
        flags = self.argv
        if self.config is not None:
            base = config_cli.load_config_file(self.config_file)
            flags = (f"--config={_relative(self.config_file)}", *config_flags(base, self.config),
                     f"--workdir={self.workdir}")
        return " ".join(["python -m llama2_jax", self.command, *map(_shown, flags)])


def _shown(argument: str) -> str:
    """An argument as typed in a shell: paths under the current directory relative to it, quoted
    in double quotes where it holds single ones (a tuple value)."""
    flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    if os.path.isabs(value) and not os.path.relpath(value).startswith(".."):
        value = os.path.relpath(value)
    argument = f"{flag}{equals}{value}"
    if shlex.quote(argument) != argument and not set('"$`\\!') & set(argument):
        return f'"{argument}"'
    return shlex.quote(argument)


def _relative(path_spec: str) -> str:
    """A config file's `path:arg`, the path relative to the current directory when under it."""
    path, colon, arg = path_spec.partition(":")
    relative = os.path.relpath(path)
    return f"{path if relative.startswith('..') else relative}{colon}{arg}"


def config_flags(base: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """The `--config.KEY=VALUE` flags that turn `base` into `config` (keys whose values differ)."""
    flags = []
    for key in config_cli.flat_keys(config):
        value = config[key]
        if base[key] != value:
            one_string = isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str)
            text = value if isinstance(value, str) else value[0] if one_string else repr(value)
            flags.append(f"--config.{key}={text}")
    return flags


def command_flags(section: ml_collections.ConfigDict) -> list[str]:
    """`--key-name value` for each key of `section`, empty values and zeros (the defaults) left out."""
    flags = []
    for key, value in section.items():
        if value not in ("", 0, None):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a step runs, the earlier steps whose outputs it reads, the settings it lacks (shown in its
    commands as `<config.KEY>`), where it starts from (an input key's last part -> the step or path
    it reads), and the datasets it reads that are the user's to prepare."""

    invocations: list[Invocation]
    needs: set[str]
    missing: tuple[str, ...] = ()
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    datasets_to_prepare: tuple[str, ...] = ()

    def key_settings(self) -> str:
        """A stage's schedule in a few words (the commands show only what differs from its config file)."""
        settings = []
        for invocation in self.invocations:
            if invocation.config is not None:
                settings.append(_schedule(invocation.config))
        return "; ".join(settings)


# A stage's own keys worth seeing beside its schedule.
STAGE_KEYS = {"rejection": ("rounds", "samples", "temperature", "max_new_tokens"),
              "ppo": ("iterations", "rollouts", "kl_coef", "max_new_tokens"), "sft": (), "reward": ("margin",)}


def _schedule(config: ml_collections.ConfigDict) -> str:
    train, optimizer = config.train, config.optimizer
    length = (f"{train.steps} steps" if train.steps else
              f"{train.epochs:g} epoch{'' if train.epochs == 1 else 's'}" if train.epochs else "")
    words = [f"peak lr {optimizer.peak_lr:g}", f"batch {train.global_batch_size} x {train.seq_len}", length]
    own = config.get(config.stage)
    words += [f"{key} {own[key]}" for key in STAGE_KEYS.get(config.stage, ()) if own is not None and key in own]
    return ", ".join(word for word in words if word)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    summary: str  # with `{init_checkpoint}` and the like where the plan says what the step reads
    plan: Callable[[ml_collections.ConfigDict, Callable[[str], str]], Plan]
    instead: str = ""  # what a user may give in place of running the step

    def describe(self, plan: Plan) -> str:
        return self.summary.format(**plan.sources)


def stage_plan(name: str, inputs: dict[str, str]) -> Callable:
    """A stage step: its section as config, each of `inputs` (a dotted key: the step whose directory
    it reads) filled where the section leaves it empty."""

    def plan(config: ml_collections.ConfigDict, directory: Callable[[str], str]) -> Plan:
        section = config[name].copy_and_resolve_references()
        needs, sources = set(), {}
        for key, step in inputs.items():
            source_name = key.rpartition(".")[2]
            if section[key]:
                given = section[key]
                sources[source_name] = _relative(given if isinstance(given, str) else ", ".join(given))
                continue
            path = data_file(directory, step) if step.endswith("_data") else directory(step)
            with section.ignore_type():
                set_key(section, key, (path,) if isinstance(section[key], tuple) else path)
            needs.add(step)
            sources[source_name] = step
        missing = ()
        if not section.data.dataset:  # the data of a size whose data are only the user's
            section.data.dataset = f"<config.{name}.data.dataset>"
            missing = (f"{name}.data.dataset",)
        if section.data.paths and not section.data.data_dir:
            # Local files become a tfds dataset in the stage's own directory, so that the same
            # dataset name built from another workdir's (or checkout's) files never meets it.
            section.data.data_dir = f"{directory(name)}/tfds"
        command = stages.stage_of(section.stage).command
        return Plan([Invocation(command, config=section, config_file=config.config_files[name],
                                workdir=directory(name))], needs, missing, sources, datasets_to_prepare(section))

    return plan


def datasets_to_prepare(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The datasets a stage's config reads that neither come with the package nor are built from its
    data.paths: the user's to prepare in data.data_dir (`python -m llama2_jax data build`)."""
    from llama2_jax.data.sources import BUNDLED

    own = () if config.data.paths or config.data.dataset.startswith("<") else (config.data.dataset,)
    return tuple(name for name in (*own, *mixed_datasets(config)) if name not in BUNDLED)


def mixed_datasets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The other datasets a preference stage draws pairs from (its `mix`)."""
    settings = config.get(config.stage)
    if settings is None or "mix" not in settings:
        return ()
    from llama2_jax.stages.preference_pairs import mixture

    return tuple(mixture(config)[0][1:])


def set_key(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """`config.a.b = value` for `dotted` "a.b"."""
    *parents, leaf = dotted.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = value


def data_file(directory: Callable[[str], str], step: str) -> str:
    """The dialogs a data step writes."""
    return os.path.join(directory(step), "dialogs.jsonl")


def gatt_data(config, directory) -> Plan:
    section, missing = _required(config, "gatt_data", "dialogs")
    flags = ["--checkpoint", directory("rejection"), "--reward-models", directory("reward_helpfulness"),
             directory("reward_safety"), *command_flags(section), "--out", data_file(directory, "gatt_data")]
    return Plan([Invocation("gatt", tuple(flags))], {"rejection", "reward_helpfulness", "reward_safety"}, missing)


def distill_data(config, directory) -> Plan:
    section, missing = _required(config, "distill_data", "prompts")
    flags = ["--checkpoint", directory("gatt"), "--safety-rm", directory("reward_safety"), *command_flags(section),
             "--out", data_file(directory, "distill_data")]
    return Plan([Invocation("distill", tuple(flags))], {"gatt", "reward_safety"}, missing)


def evaluate(config, directory) -> Plan:
    section, out = config.evaluate, directory("evaluate")
    # The base model: what SFT started from (pretrain's, or weights of yours, as Meta's).
    base = config.sft.init_checkpoint or directory("pretrain")
    invocations = []
    for model, checkpoint in (("pretrain", base), ("ppo", directory("ppo"))):
        if section.dataset:
            invocations.append(Invocation("eval", ("--checkpoint", checkpoint, "--dataset", section.dataset,
                                                   "--out", os.path.join(out, f"perplexity_{model}.json"))))
        if section.task:
            invocations.append(Invocation("eval", ("--checkpoint", checkpoint, "--task", section.task,
                                                   "--out", os.path.join(out, f"task_{model}.json"))))
    flags = ["--reference", directory("sft")]
    for policy in POLICIES[1:]:
        flags += ["--policy", directory(policy)]
    flags += ["--reward-models", directory("reward_helpfulness"), directory("reward_safety"),
              "--prompts", section.prompts, "--answer-tokens", str(section.answer_tokens)]
    flags += ["--instructions", section.instructions] if section.instructions else []
    invocations.append(Invocation("compare", (*flags, "--out", os.path.join(out, "policies.json"))))
    needs = {*POLICIES, "reward_helpfulness", "reward_safety"}
    return Plan(invocations, needs | {"pretrain"} if base == directory("pretrain") else needs)


def chat(config, directory) -> Plan:
    section, missing = _required(config, "chat", "prompts")
    flags = ("--checkpoint", directory("ppo"), "--prompts", os.path.join(directory("chat"), "prompts.jsonl"),
             "--max-new-tokens", str(section.max_new_tokens), "--out", os.path.join(directory("chat"), "answers.jsonl"))
    return Plan([Invocation("generate", flags)], {"ppo"}, missing)


def write_chat_prompts(config: ml_collections.ConfigDict, directory: Callable[[str], str]) -> None:
    """The chat step's prompts: the first `chat.count` of `chat.prompts`."""
    with open(config.chat.prompts, encoding="utf-8") as lines:
        prompts = [line for line in lines if line.strip()][: config.chat.count]
    target = storage.as_path(directory("chat"))
    target.mkdir(parents=True, exist_ok=True)
    (target / "prompts.jsonl").write_text("".join(prompts), encoding="utf-8")


def _required(config: ml_collections.ConfigDict, name: str, key: str) -> tuple[ml_collections.ConfigDict, tuple]:
    """The section, with `<config.NAME.KEY>` standing for a required value it lacks."""
    section = config[name]
    if section[key]:
        return section, ()
    section = section.copy_and_resolve_references()
    section[key] = f"<config.{name}.{key}>"
    return section, (f"{name}.{key}",)


# The policies of the recipe, in order: each is compared with the first on the held-out prompts.
POLICIES = ("sft", "rejection", "gatt", "distill", "ppo")

STEPS = (
    Step("pretrain", "pretraining: the base model", stage_plan("pretrain", {}),
         instead="or weights of yours, Meta's or Hugging Face's: --config.sft.init_checkpoint=DIR with "
                 "--config.stages=sft,reward_helpfulness,... (every stage but pretrain)"),
    Step("sft", "supervised fine-tuning on dialogs, from {init_checkpoint}",
         stage_plan("sft", {"init_checkpoint": "pretrain"})),
    Step("reward_helpfulness", "the helpfulness reward model, from {init_checkpoint}",
         stage_plan("reward_helpfulness", {"init_checkpoint": "sft"})),
    Step("reward_safety", "the safety reward model, from {init_checkpoint}",
         stage_plan("reward_safety", {"init_checkpoint": "sft"})),
    Step("rejection", "rejection sampling from {init_checkpoint}, scored by {helpfulness_rm} and {safety_rm}",
         stage_plan("rejection", {"init_checkpoint": "sft", "rejection.helpfulness_rm": "reward_helpfulness",
                                  "rejection.safety_rm": "reward_safety"})),
    Step("gatt_data", "Ghost Attention dialogs sampled from rejection, reranked by both reward models", gatt_data),
    Step("gatt", "the Ghost Attention round: {init_checkpoint} fine-tuned on {paths}",
         stage_plan("gatt", {"init_checkpoint": "rejection", "data.paths": "gatt_data"})),
    Step("distill_data", "safety context distillation: gatt's answers under a safety preprompt, kept when safer",
         distill_data),
    Step("distill", "{init_checkpoint} fine-tuned on {paths}", stage_plan("distill", {"init_checkpoint": "gatt",
                                                                              "data.paths": "distill_data"})),
    Step("ppo", "PPO from {init_checkpoint} with {helpfulness_rm} and {safety_rm}",
         stage_plan("ppo", {"init_checkpoint": "distill", "ppo.helpfulness_rm": "reward_helpfulness",
                            "ppo.safety_rm": "reward_safety"})),
    Step("evaluate", "perplexity and the next-line task; every policy's held-out reward and KL to sft", evaluate),
    Step("chat", "the final policy answers a few held-out prompts", chat),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def selected(stages_flag: str) -> list[Step]:
    """The steps `config.stages` names (all when empty), in the recipe's order."""
    from llama2_jax.errors import ConfigError

    names = [name.strip() for name in stages_flag.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEP_NAMES]
    if unknown:
        raise ConfigError(f"unknown stage {', '.join(map(repr, unknown))} in config.stages; the stages are "
                          f"{', '.join(STEP_NAMES)}")
    return [step for step in STEPS if not names or step.name in names]


# What the pipeline's own keys mean (a stage section's keys mean what they do in that stage's config).
COMMAND_DOCS = {
    "size": "the model size every stage's config was made for",
    "stages": f"a comma-separated subset of the stages to run ({', '.join(STEP_NAMES)}); empty: all",
    "config_files.*": "the config file (and its argument) a stage section was made from; its commands print "
                      "what differs from it",
    "gatt_data.dialogs": "multi-turn chat JSONL whose user turns get the instruction (gatt --dialogs)",
    "gatt_data.limit": "the first N dialogs only (0: all)",
    "gatt_data.samples": "answers sampled per turn, the best that follows the instruction kept",
    "gatt_data.answer_tokens": "longest answer per turn",
    "gatt_data.seed": "which instruction each dialog gets, and the sampling seed",
    "distill_data.prompts": "JSON lines of adversarial prompts answered under a safety preprompt (distill --prompts)",
    "distill_data.limit": "the first N prompts only (0: all)",
    "distill_data.answer_tokens": "longest answer",
    "distill_data.seed": "which preprompt each prompt gets, and the sampling seed",
    "evaluate.dataset": "held-out text for perplexity of pretrain and ppo, NAME:SPLIT (empty: none)",
    "evaluate.task": "a multiple-choice task file for pretrain and ppo (empty: none)",
    "evaluate.prompts": "held-out prompts every policy answers: a .jsonl file or a dataset's NAME:SPLIT",
    "evaluate.instructions": "held-out prompts ending with a GAtt instruction, the same way (empty: none)",
    "evaluate.answer_tokens": "longest answer",
    "chat.prompts": "JSON lines of prompts, the first chat.count of which the final policy answers",
    "chat.count": "how many prompts the final policy answers",
    "chat.max_new_tokens": "longest answer",
}
