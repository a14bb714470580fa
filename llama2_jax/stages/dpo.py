"""DPO: the policy trained straight on preference pairs, against a frozen reference, no reward model.

    python -m llama2_jax dpo --config=configs/dpo.py:tiny --workdir=runs/dpo
    python -m llama2_jax dpo --config=configs/dpo.py:7b --config.init_checkpoint=runs/sft-7b \
        --workdir=/data/runs/dpo-7b

The pairs are the reward stage's: the same datasets and mixes (`dpo.mix`: by default the
companions of a bundled or paper dataset, nothing for `data.paths`; one line says what is mixed),
the same safety rule (`dpo.safety_rule`), the same counts of what is skipped and why, and the same
batches, both answers of a pair in one row; each answer also carries its token mask
(llama2_jax/data/preferences.py). The policy starts from `init_checkpoint`, which is also the
frozen reference unless `dpo.reference` names another, loaded once in `dpo.frozen_dtype` on the
run's mesh and never saved: each batch gains the reference's log-probs of its two answers on its
way to the step (`ReferenceLogProbs`), so the loop, `aot` and `bench` run DPO like any stage. The
loss and its metrics are llama2_jax/train/dpo_loss.py; the paper's rating margins carry over
(`dpo.margin`). At the end the last evaluation is printed by rating level and safety bin; the
workdir loads as a language model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.batch import BatchSpec, Field
from llama2_jax.data.pipeline import Mixture, make_batches
from llama2_jax.data.preferences import preference_spec
from llama2_jax.data.records import RATING_LEVELS
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.model import lora
from llama2_jax.stages import preference_pairs as pairs
from llama2_jax.stages.initial import (initial_tokenizer, load_initial_model, start_from_checkpoint,
                                       set_steps_from_epochs)
from llama2_jax.rollout.prompts import check_models_of
from llama2_jax.train.config import model_config_from
from llama2_jax.train.dpo_loss import LOSSES, answer_log_probs, make_dpo_loss
from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.preference_loss import MARGINS, SAFETY_BINS
from llama2_jax.train.task import Task

STAGE = "dpo"
CONFIG_DOCS = {
    "init_checkpoint": "the policy to start from (an SFT model), and the frozen reference unless dpo.reference is set",
    "dpo.reference": "the frozen reference policy (empty: init_checkpoint; with lora.rank > 0 the policy's own base, "
                     "adapters off, read in the step without a second copy)",
    "dpo.beta": "beta: how far the implicit reward beta (log pi - log pi_ref) scales",
    "dpo.loss": "sigmoid (DPO) or ipo",
    "dpo.margin": "m(rating) subtracted inside the sigmoid, the reward stage's tables: none, small (1, 2/3, 1/3, "
                  "0) or large (3, 2, 1, 0); unrated pairs get 0",
    "dpo.safety_rule": "skip pairs whose chosen answer is unsafe while the rejected one is safe, in every dataset "
                       "with safety labels",
    "dpo.mix": pairs.MIX_DOC,
    "dpo.frozen_dtype": "storage dtype of the frozen reference",
}
REFERENCE_FIELDS = ("reference_chosen", "reference_rejected")
log = logging.getLogger(__name__)


def check_config(config: ml_collections.ConfigDict) -> None:
    settings = config.dpo
    if settings.loss not in LOSSES:
        raise ConfigError(f"dpo.loss={settings.loss!r}; choose one of {', '.join(LOSSES)}")
    if settings.margin not in MARGINS:
        raise ConfigError(f"dpo.margin={settings.margin!r}; choose one of {', '.join(MARGINS)}")
    if settings.loss == "ipo" and settings.margin != "none":
        raise ConfigError("dpo.margin applies inside the sigmoid loss; set dpo.margin=none with dpo.loss=ipo")
    if settings.beta <= 0:
        raise ConfigError(f"dpo.beta is {settings.beta}; it must be above 0")
    if config.train.z_loss_weight or config.train.eval_tasks:
        raise ConfigError("train.z_loss_weight and train.eval_tasks are not DPO's; leave them 0 and empty")
    pairs.mixture(config)


def batch_spec(seq_len: int, reference: bool = True) -> BatchSpec:
    """The reward stage's pair rows with answer masks, and (unless the step computes them itself)
    the reference's log-probs per pair."""
    pairs = preference_spec(seq_len, answer_masks=True)
    fields = {name: Field((), "float32", "zeros") for name in REFERENCE_FIELDS} if reference else {}
    return BatchSpec({**pairs.fields, **fields}, packed=False, weight_field=pairs.weight_field)


def with_reference_in_step(loss_fn):
    """DPO's loss for a policy that trains adapters: the reference is its own base, the adapters
    off (`lora.without_adapters`), read in the step from the weights the policy already holds, so
    no second copy is loaded. The same numbers a separately loaded base gives."""

    def loss(model, batch):
        chosen, rejected = jax.lax.stop_gradient(answer_log_probs(lora.without_adapters(model), batch))
        return loss_fn(model, {**batch, "reference_chosen": chosen, "reference_rejected": rejected})

    return loss


@functools.partial(jax.jit, static_argnums=0)
def _reference_log_probs(graphdef, state, batch):
    return answer_log_probs(nnx.merge(graphdef, state), batch)


class ReferenceLogProbs:
    """Batches of pairs, each given the frozen reference's log-probs of its answers on the way to the
    step (computed on the mesh, never on the host). Saves and restores the position of the batches
    it wraps."""

    def __init__(self, batches, reference: Callable[[], nnx.Module]):
        self.batches, self.reference = batches, reference

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        graphdef, state = nnx.split(self.reference())
        chosen, rejected = _reference_log_probs(graphdef, state, batch)
        return {**batch, "reference_chosen": chosen, "reference_rejected": rejected}

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> Task:
    """DPO's loss over the pairs of `config.data` and `config.dpo.mix`, from `config.init_checkpoint`,
    against the frozen reference."""
    check_config(config)
    train_config, data = config.train, config.data
    pairs_spec = preference_spec(train_config.seq_len, answer_masks=True)
    model_config = model_config_from(config)
    # A policy that trains adapters is its own reference, adapters off; dpo.reference names another.
    reference_in_step = bool(model_config.lora_rank) and not config.dpo.reference
    references: dict[int, nnx.Module] = {}

    def reference(mesh: Mesh, rules) -> Callable[[], nnx.Module]:
        def load() -> nnx.Module:
            if id(mesh) not in references:
                references[id(mesh)] = load_pretrained(
                    config.dpo.reference or config.init_checkpoint, config.model.compute_dtype,
                    param_dtype=config.dpo.frozen_dtype, mesh=mesh, rules=rules,
                    max_seq_len=config.model.max_seq_len)
            return references[id(mesh)]

        return load

    def batches(mesh, rules, split: str, num_epochs: int | None):
        pair_tokenizer = tokenizer or initial_tokenizer(config)
        if split == data.train_split:
            names, shares = pairs.mixture(config)
            source = Mixture([pairs.open_preferences(config, name, split) for name in names], shares)
        else:
            source = pairs.open_preferences(config, data.dataset, split)
        made = make_batches(data, source, pairs_spec, pairs.pair_encoder(config, pair_tokenizer, answer_masks=True),
                            global_batch_size=train_config.global_batch_size, mesh=mesh, rules=rules,
                            seed=train_config.seed, num_epochs=num_epochs)
        return made if reference_in_step else ReferenceLogProbs(made, reference(mesh, rules))

    loss_fn = make_dpo_loss(beta=config.dpo.beta, loss=config.dpo.loss, margin=config.dpo.margin)
    return Task(
        model_config=model_config,
        loss_fn=with_reference_in_step(loss_fn) if reference_in_step else loss_fn,
        batch_spec=batch_spec(train_config.seq_len, reference=not reference_in_step),
        train_batches=lambda mesh, rules: batches(mesh, rules, data.train_split, None),
        eval_batches=((lambda mesh, rules: batches(mesh, rules, data.eval_split, 1))
                      if train_config.eval_every else None),
        initial_model=lambda mesh, rules: load_initial_model(config, mesh, rules),
        model_kind="llama",
        tokenizer_path=str(tokenizer.path) if tokenizer else None,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """DPO as `config` says in `workdir` (resuming if it holds checkpoints)."""
    check_config(config)
    tokenizer = start_from_checkpoint(config, kind="llama")
    check_models_of(config, tokenizer, {"dpo.reference": (config.dpo.reference, "llama")}, "train.seq_len", 0)
    counts = pairs.count_pairs(config, tokenizer)
    set_steps_from_epochs(config, pairs.pairs_per_epoch(config, counts))
    result = train(config, workdir, make_task(config, tokenizer))
    if result.eval_metrics and not result.interrupted and jax.process_index() == 0:
        print(evaluation_table(result.eval_metrics, config.train.steps))
    return result


def evaluation_table(values: dict, step: int) -> str:
    """The last evaluation: the implicit rewards' accuracy by rating level and safety bin."""
    lines = [f"\nheld-out implicit-reward accuracy after step {step}: {values['accuracy']:.3f} over "
             f"{values['weight']:.0f} pairs",
             f"  answer log-probs: chosen {values['chosen_log_prob']:.2f}, rejected {values['rejected_log_prob']:.2f}; "
             f"implicit reward margin {values['reward_margin']:.3f}"]
    for group, names in (("rating", RATING_LEVELS), ("safety (chosen, rejected)", SAFETY_BINS)):
        counted = [name for name in names if values[f"accuracy_{name}_weight"]]
        lines += [f"  by {group}:"] if counted else []
        lines += [f"    {name:<28} {values[f'accuracy_{name}']:.3f}  ({values[f'accuracy_{name}_weight']:.0f} pairs)"
                  for name in counted]
    return "\n".join(lines)
