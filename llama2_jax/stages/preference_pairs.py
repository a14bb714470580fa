"""What the stages that train on preference pairs (reward, dpo) share: the datasets drawn into
training and their shares (the section's `mix`), how a pair is encoded, and how many pairs an epoch
holds.
"""

from __future__ import annotations

import logging

import jax
import ml_collections

from llama2_jax.data import sources
from llama2_jax.data.companions import companions
from llama2_jax.data.pipeline import open_split
from llama2_jax.data.preferences import PairCounts, PreferencePairs, scan
from llama2_jax.data.records import DataError
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError

log = logging.getLogger(__name__)

# The `mix` key of the stages that train on preference pairs (reward, dpo).
MIX_DOC = ("the other prepared preference datasets drawn into training: None, the companions of a bundled or "
           "paper data.dataset (llama2_jax/data/companions.py) and none for data.paths; ((name, share of the "
           "pairs), ...), yours; (), none. data.dataset takes the rest, and an epoch is one pass over it")

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


def pair_encoder(config: ml_collections.ConfigDict, tokenizer: Tokenizer, answer_masks: bool = False) -> PreferencePairs:
    return PreferencePairs(tokenizer, config.train.seq_len, safety_rule=pair_settings(config).safety_rule,
                           answer_masks=answer_masks)


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


def report(line: str) -> None:
    log.info("%s", line)
    if jax.process_index() == 0:
        print(line)
