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
from llama2_jax.data.pipeline import Mixture, make_batches
from llama2_jax.data.preferences import preference_spec
from llama2_jax.data.records import RATING_LEVELS
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.stages.initial import (initial_tokenizer, load_initial_model, start_from_checkpoint,
                                       set_steps_from_epochs)
from llama2_jax.stages.preference_pairs import (MIX_DOC, count_pairs, mixture, open_preferences, pair_encoder,
                                                pairs_per_epoch)
from llama2_jax.train.config import model_config_from
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.preference_loss import MARGINS, SAFETY_BINS, UNSAFE_THRESHOLD, make_preference_loss
from llama2_jax.train.task import Task

STAGE = "reward"
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


def check_config(config: ml_collections.ConfigDict) -> None:
    """A config error for a key a reward model cannot use, before any data or weights are read."""
    if config.train.z_loss_weight or config.train.eval_tasks:
        raise ConfigError("train.z_loss_weight and train.eval_tasks act on next-token logits, which a reward "
                          "model has none of; leave them 0 and empty")
    if config.reward.margin not in MARGINS:
        raise ConfigError(f"reward.margin={config.reward.margin!r}; choose one of {', '.join(MARGINS)}")
    mixture(config)


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

