"""Reward models: helpfulness or safety, trained on preference pairs with a ranking loss.

    python -m llama2_jax reward --config=configs/reward.py:tiny --workdir=runs/reward
    python -m llama2_jax reward --config=configs/reward.py:tiny,safety --workdir=runs/reward_safety
    python -m llama2_jax reward --config=configs/reward.py:7b --config.init_checkpoint=runs/sft-7b \
        --workdir=/data/runs/reward-7b

The model is the initial checkpoint's backbone with a scalar head in place of the next-token head
(a language model gets a new head; a reward model, ours or a Hugging Face
LlamaForSequenceClassification, keeps its own), scoring the last token of prompt + response in the
Llama 2 chat format. Both responses of a pair go through the model in the same batch
(llama2_jax/data/preferences.py, llama2_jax/train/preference_loss.py). Training reads `data.dataset`
mixed with the datasets of `reward.mix` in their shares: by default (None) the companions of a
bundled or paper dataset (llama2_jax/data/companions.py), nothing for files of your own
(`data.paths`); one line says what is mixed. Evaluations read the held-out split of `data.dataset`
alone. With `train.steps` 0 the run lasts `train.epochs` passes over `data.dataset`.
Pairs that cannot be used are counted by reason before training starts. At the end the last
evaluation is printed by rating level and safety bin; the stage runner draws its score histogram
to `WORKDIR/score_histogram.png` with the run's other figures (llama2_jax/plots.py). The workdir
loads with `llama2_jax.load_pretrained` as the reward model and scores with
`llama2_jax.reward.score` or `python -m llama2_jax score`.
"""

from __future__ import annotations

import logging

import jax
import ml_collections

from llama2_jax.errors import ConfigError
from llama2_jax.data import sources
from llama2_jax.data.companions import companions
from llama2_jax.data.pipeline import Mixture, make_batches, open_split
from llama2_jax.data.preferences import PairCounts, PreferencePairs, preference_spec, scan
from llama2_jax.data.records import RATING_LEVELS, DataError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.stages.initial import (initial_tokenizer, load_initial_model, start_from_checkpoint,
                                       set_steps_from_epochs)
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.preference_loss import MARGINS, SAFETY_BINS, UNSAFE_THRESHOLD, make_preference_loss
from llama2_jax.train.task import Task

STAGE = "reward"
# The `mix` key of the stages that train on preference pairs (reward, dpo).
MIX_DOC = ("the other prepared preference datasets drawn into training: None, the companions of a bundled or "
           "paper data.dataset (llama2_jax/data/companions.py) and none for data.paths; ((name, share of the "
           "pairs), ...), yours; (), none. data.dataset takes the rest, and an epoch is one pass over it")
CONFIG_DOCS = {
    "init_checkpoint": "the model to start from: a chat/SFT or pretrained language model (it gets a new score "
                       "head), or a reward model (ours, or Hugging Face LlamaForSequenceClassification)",
    "reward.margin": "m(rating) in the loss, strongest level first: none, small (1, 2/3, 1/3, 0) or large "
                     "(3, 2, 1, 0); unrated pairs get 0",
    "reward.centering": "weight of the reward-centering term (r_chosen + r_rejected)^2 (0: off)",
    "reward.safety_rule": "skip pairs whose chosen answer is unsafe while the rejected one is safe, in every "
                          "dataset with safety labels (the paper's rule for both models; false: keep them)",
    "reward.safety_aux_weight": "weight of the binary safe/unsafe loss on each response with a safety label "
                                "(the paper's A.3.4 for the safety model; 0: off)",
    "reward.mix": MIX_DOC,
}

log = logging.getLogger(__name__)


def pair_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The section of a stage that trains on preference pairs (`reward`, `dpo`): its `mix`,
    `safety_rule` and `margin` keys say how the pairs are drawn, filtered and weighted."""
    return config[config.stage]


def mix_entries(config: ml_collections.ConfigDict) -> tuple:
    """The stage's `mix` as given, or for None the companions of data.dataset."""
    mix = pair_settings(config).mix
    if mix is None:
        return companions(config.data)
    if not isinstance(mix, (tuple, list)):
        key = f"{config.stage}.mix"
        raise ConfigError(f"{key}={mix!r} is not ((dataset name, share), ...); e.g. "
                          f"--config.{key}='((\"safety_pairs\", 0.5),)', or () for none")
    return mix


def mixture(config: ml_collections.ConfigDict) -> tuple[list[str], list[float]]:
    """The training datasets and their shares of the pairs: data.dataset first, with what the
    stage's `mix` leaves."""
    names, shares, key = [config.data.dataset], [], f"{config.stage}.mix"
    for entry in mix_entries(config):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and entry[1] > 0):
            raise ConfigError(f"{key} entry {entry!r} is not (dataset name, share > 0); e.g. "
                              f"--config.{key}='((\"safety_pairs\", 0.5),)'")
        names.append(entry[0])
        shares.append(float(entry[1]))
    if sum(shares) >= 1:
        raise ConfigError(f"the shares of {key} add up to {sum(shares):g}, leaving nothing for data.dataset "
                          f"{config.data.dataset}; make them add up to less than 1")
    return names, [1 - sum(shares), *shares]


def mixture_line(config: ml_collections.ConfigDict) -> str:
    """What training draws from, in shares of the pairs, and why."""
    names, shares = mixture(config)
    drawn = ", ".join(f"{name} {share:g}" for name, share in zip(names, shares))
    key = f"{config.stage}.mix"
    if pair_settings(config).mix is not None:
        why = f"{key} as set"
    elif len(names) > 1:
        why = f"{key} None: the companions of {config.data.dataset}; {key}=() trains on it alone"
    else:
        source = "data.paths" if config.data.paths else config.data.dataset
        why = f"{key} None: nothing is mixed into {source}; {key}=((name, share), ...) names datasets to mix in"
    return f"training mix: {drawn} ({why})"


def open_preferences(config: ml_collections.ConfigDict, name: str, split: str):
    """The `split` of preference dataset `name`: data.dataset as the data section says (built from
    data.paths if given), another one already prepared in data.data_dir."""
    if name == config.data.dataset:
        return open_split(config.data, split, kind="preferences")
    try:
        builder = sources.prepared_dataset(name, config.data.data_dir or None)
    except DataError as error:
        key = f"{config.stage}.mix"
        raise DataError(f"{key} mixes in {name}, and {error}; or set {key}=() to train on {config.data.dataset} "
                        "alone") from None
    sources.check_kind(builder, "preferences")
    return sources.data_source(builder, split)


def check_config(config: ml_collections.ConfigDict) -> None:
    """A config error for a key a reward model cannot use, before any data or weights are read."""
    if config.train.z_loss_weight or config.train.eval_tasks:
        raise ConfigError("train.z_loss_weight and train.eval_tasks act on next-token logits, which a reward "
                          "model has none of; leave them 0 and empty")
    if config.reward.margin not in MARGINS:
        raise ConfigError(f"reward.margin={config.reward.margin!r}; choose one of {', '.join(MARGINS)}")
    mixture(config)


def pair_encoder(config: ml_collections.ConfigDict, tokenizer: Tokenizer, answer_masks: bool = False) -> PreferencePairs:
    return PreferencePairs(tokenizer, config.train.seq_len, safety_rule=pair_settings(config).safety_rule,
                           answer_masks=answer_masks)


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Task:
    """The ranking loss over the preference pairs of `config.data` and `config.reward.mix`, from
    `config.init_checkpoint` loaded as a reward model."""
    check_config(config)
    model_config = model_config_from(config)
    train_config, data = config.train, config.data
    spec = preference_spec(train_config.seq_len)

    def batches(mesh, rules, split: str, num_epochs: int | None):
        pair_tokenizer = tokenizer or initial_tokenizer(config)
        if split == data.train_split:
            names, shares = mixture(config)
            source = Mixture([open_preferences(config, name, split) for name in names], shares)
        else:
            source = open_preferences(config, data.dataset, split)
        return make_batches(data, source, spec, pair_encoder(config, pair_tokenizer),
                            global_batch_size=train_config.global_batch_size, mesh=mesh, rules=rules,
                            seed=train_config.seed, num_epochs=num_epochs)

    return Task(
        model_config=model_config,
        loss_fn=make_preference_loss(margin=config.reward.margin, centering=config.reward.centering,
                                     safety_aux=config.reward.safety_aux_weight),
        batch_spec=spec,
        train_batches=lambda mesh, rules: batches(mesh, rules, data.train_split, None),
        eval_batches=((lambda mesh, rules: batches(mesh, rules, data.eval_split, 1))
                      if train_config.eval_every else None),
        initial_model=lambda mesh, rules: load_initial_model(config, mesh, rules, kind="reward"),
        model_kind="reward",
        tokenizer_path=str(tokenizer.path) if tokenizer else None,
    )


def count_pairs(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[PairCounts]:
    """What the encoder makes of every training dataset, printed; an error for a dataset of which
    nothing can be trained on."""
    encoder = pair_encoder(config, tokenizer)
    report(mixture_line(config))
    counts = [scan(name, open_preferences(config, name, config.data.train_split), encoder)
              for name in mixture(config)[0]]
    for found in counts:
        report(f"training pairs: {found.summary()}")
        if found.used == 0:
            raise DataError(f"none of the {found.total} pairs of {found.name} can be trained on; check the dataset "
                            "and train.seq_len")
    if config.train.eval_every:
        held_out = open_preferences(config, config.data.dataset, config.data.eval_split)
        report(f"held-out pairs: {scan(config.data.dataset, held_out, encoder).summary()}")
    return counts


def pairs_per_epoch(config: ml_collections.ConfigDict, counts: list[PairCounts]) -> float:
    """Pairs trained on in one pass over data.dataset: those drawn from every dataset meanwhile (in
    their shares), less those skipped."""
    _, shares = mixture(config)
    drawn = counts[0].total / shares[0]
    return sum(share * drawn * found.used / found.total for share, found in zip(shares, counts))


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Train the reward model as `config` says in `workdir` (resuming if it holds checkpoints)."""
    check_config(config)
    tokenizer = start_from_checkpoint(config, kind=None)  # a language model, or a reward model to train on
    # A reward model's context is what it is trained on, so it scores longer inputs as it was trained to.
    config.model.max_seq_len = min(config.model.max_seq_len, config.train.seq_len)
    counts = count_pairs(config, tokenizer)
    set_steps_from_epochs(config, pairs_per_epoch(config, counts))
    result = train(config, workdir, make_task(config, tokenizer))
    if result.eval_metrics and not result.interrupted and jax.process_index() == 0:
        print(evaluation_table(result.eval_metrics, config.train.steps))
    return result


def evaluation_table(values: dict, step: int) -> str:
    """The last evaluation by rating level and safety bin: accuracy and pairs counted."""
    lines = [f"\nheld-out accuracy after step {step}: {values['accuracy']:.3f} over {values['weight']:.0f} pairs",
             f"  mean score chosen {values['chosen_score']:.3f}, rejected {values['rejected_score']:.3f}, "
             f"margin {values['score_margin']:.3f}"]
    for group, names in (("rating", RATING_LEVELS), ("safety (chosen, rejected)", SAFETY_BINS)):
        counted = [name for name in names if values[f"accuracy_{name}_weight"]]
        lines += [f"  by {group}:"] if counted else []
        lines += [f"    {name:<28} {values[f'accuracy_{name}']:.3f}  ({values[f'accuracy_{name}_weight']:.0f} pairs)"
                  for name in counted]
    if values["unsafe_recall_weight"]:
        lines.append(f"  unsafe answers scored below {UNSAFE_THRESHOLD}: {values['unsafe_recall']:.3f} "
                     f"({values['unsafe_recall_weight']:.0f} answers)")
    return "\n".join(lines)


def report(line: str) -> None:
    log.info("%s", line)
    if jax.process_index() == 0:
        print(line)
