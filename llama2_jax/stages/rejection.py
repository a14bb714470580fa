"""Rejection-sampling fine-tuning, the paper's §3.2.3: rounds of K answers per prompt from the newest
policy, the best by both reward models, pooled over every round, fine-tuned on as in SFT.

    python -m llama2_jax rejection --config=configs/rejection.py:tiny --workdir=runs/rejection
    python -m llama2_jax rejection --config=configs/rejection.py:7b --config.init_checkpoint=runs/sft-7b \
        --config.rejection.helpfulness_rm=runs/rm-h-7b --config.rejection.safety_rm=runs/rm-s-7b \
        --config.rejection.sample_from=runs/rejection-70b --workdir=/data/runs/rejection-7b

A round (rejection.rounds of them):

    sample   K answers (rejection.samples) to every training prompt (data.train_split) from the newest
             policy, or every round from rejection.sample_from (a larger policy: distillation), at the
             round's temperature (llama2_jax/rollout/sampler.py)
    score    every answer by the helpfulness and the safety reward model, as the token ids sampled
    select   per prompt the answer with the highest combined reward (llama2_jax.reward.combine)
    pool     the best answer per prompt over every round so far (llama2_jax/selection.py)
    train    SFT's answer-only loss on the pool, from the newest policy, on the one training loop
    evaluate the held-out prompts (data.eval_split) answered as chat answers them and scored, as
             before round 1

Each phase's output is a file of the workdir written whole (rejection_files.py lists them), so a run
stopped by SIGTERM or Ctrl-C (exit status 75) or killed resumes in the phase it stopped in, without
sampling or scoring again what it had finished; the fine-tuning resumes from its own checkpoints.
After every round the workdir holds the newest policy as a checkpoint of its own, which
`load_pretrained`, `chat`, `eval`, `convert` and a later stage read like any other. Every round logs
the paper's Figure 7 (the mean over prompts of the best and the median reward among the first k
samples, k = 1, 2, 4, ... K), the mean reward of the pool, the share of prompts whose pool entry
changed, each phase's seconds and the samples per second; `best_of_k.png` draws the curves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from llama2_jax import metrics as metrics_lib
from llama2_jax import selection, sharding, storage
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.data.dialogs import DialogPieces, scan
from llama2_jax.data.prompts import split_prompts
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.errors import ConfigError
from llama2_jax.generate import SamplingParams
from llama2_jax.rollout import files as rollout_files
from llama2_jax.rollout.prompts import PromptSet, check_models_of, encode_prompts
from llama2_jax.rollout.sampler import (CUT_ANSWER_EOS, Answer, Sampler, answer_held_out, sampling_seed,
                                        scored_sequence)
from llama2_jax.rollout.scoring import score_answers
from llama2_jax.stages import rejection_files as files
from llama2_jax.stages import rejection_metrics
from llama2_jax.stages.initial import set_steps_from_epochs, start_from_checkpoint
from llama2_jax.stages.next_token import dialog_task, rows_per_epoch
from llama2_jax.train.loop import train
from llama2_jax.train.stopping import StopRequests
from llama2_jax.train.task import Task

STAGE = "rejection"
CONFIG_DOCS = {
    "train.steps": "optimizer steps of each round's fine-tuning (0: from train.epochs)",
    "train.epochs": "passes over the pool in each round's fine-tuning when train.steps is 0",
    "train.seed": "data order, and the seeds of each round's sampling batches",
    "init_checkpoint": "the policy to start from (round 1 samples from it): the SFT model, any format "
                       "load_pretrained reads",
    "rejection.helpfulness_rm": "workdir or checkpoint of the helpfulness reward model",
    "rejection.safety_rm": "workdir or checkpoint of the safety reward model (empty: helpfulness only)",
    "rejection.sample_from": "a policy that samples every round in place of the one trained here, as the "
                             "paper's 70B samples for its smaller models (empty: the newest policy)",
    "rejection.samples": "K: answers sampled per prompt",
    "rejection.temperature": "sampling temperature: one value for every round, or one per round",
    "rejection.rounds": "rounds of sample, score, select, pool and fine-tune",
    "rejection.max_new_tokens": "longest answer, in tokens",
    "rejection.batch_size": "answers decoding together (the sampler's slots); answers are saved in parts of 8 x that",
    "rejection.score_batch_size": "sequences per reward-model batch",
    "rejection.eval_prompts": "held-out prompts (data.eval_split) answered (temperature 0.6, top-p 0.9) and scored "
                              "before the first round and after each (0: none)",
}
log = logging.getLogger(__name__)


def make_task(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
              dialogs: Sequence[Mapping[str, Any]] = ()) -> Task:
    """A round's fine-tuning: SFT's answer-only loss over the pool's dialogs, from config.init_checkpoint
    (the policy the round sampled from)."""
    return dialog_task(config, tokenizer, dialogs=list(dialogs))


@dataclasses.dataclass(frozen=True)
class RejectionResult:
    rounds: int  # rounds finished
    pool: dict[int, selection.PoolEntry]
    interrupted: bool  # stopped by SIGTERM or Ctrl-C; rerunning resumes


def run(config: ml_collections.ConfigDict, workdir: str) -> RejectionResult:
    """Rejection sampling as `config` says, in `workdir`, resuming whatever an earlier run finished."""
    check_config(config)
    tokenizer = start_from_checkpoint(config, kind="llama")
    context = check_models(config, tokenizer) - config.rejection.max_new_tokens - CUT_ANSWER_EOS
    training = encode_prompts(split_prompts(config.data, config.data.train_split), tokenizer, context)
    held_out = encode_prompts(split_prompts(config.data, config.data.eval_split)[:config.rejection.eval_prompts],
                              tokenizer, context) if config.rejection.eval_prompts else None
    held_out = held_out if held_out and held_out.indices else None
    if not training.indices:
        raise ValueError(f"none of the {len(training.prompts)} training prompts leaves "
                         f"{config.rejection.max_new_tokens} tokens for an answer in a context of "
                         f"{context + config.rejection.max_new_tokens + CUT_ANSWER_EOS}; lower "
                         "rejection.max_new_tokens or give "
                         "shorter prompts")
    _print(f"training prompts: {len(training.indices)} of {len(training.prompts)} ({training.skipped} too long to "
           f"answer in the context, skipped)" + (f"; held-out prompts: {len(held_out.indices)} of "
                                                  f"{len(held_out.prompts)}" if held_out else ""))
    rollout_files.write_json(storage.as_path(workdir) / "config.json", config.to_dict())
    return _Run(config, workdir, tokenizer, training, held_out).rounds()


def check_config(config: ml_collections.ConfigDict) -> None:
    """One ConfigError naming the key for a value the stage cannot use."""
    settings = config.rejection
    if settings.samples < 1:
        raise ConfigError(f"rejection.samples is {settings.samples}; sample at least 1 answer per prompt")
    if settings.rounds < 1:
        raise ConfigError(f"rejection.rounds is {settings.rounds}; run at least 1 round")
    if settings.max_new_tokens < 1:
        raise ConfigError(f"rejection.max_new_tokens is {settings.max_new_tokens}; allow at least 1 token")
    temperatures = tuple(settings.temperature)
    if 1 < len(temperatures) < settings.rounds or not temperatures:
        raise ConfigError(f"rejection.temperature gives {len(temperatures)} values for {settings.rounds} rounds; "
                          "give one value, or one per round")
    if min(temperatures) < 0:
        raise ConfigError(f"rejection.temperature {temperatures} holds a negative value; 0 is greedy")
    if not settings.helpfulness_rm:
        raise ConfigError("set rejection.helpfulness_rm to the helpfulness reward model "
                          "(python -m llama2_jax reward writes one)")


def temperature(config: ml_collections.ConfigDict, round_number: int) -> float:
    temperatures = tuple(config.rejection.temperature)
    return float(temperatures[0] if len(temperatures) == 1 else temperatures[round_number - 1])


def check_models(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> int:
    """One clear error unless the reward models are reward models and the sampling policy a language
    model, all with the policy's tokenizer; returns the context every one of them can read."""
    settings = config.rejection
    return check_models_of(config, tokenizer, {"rejection.helpfulness_rm": (settings.helpfulness_rm, "reward"),
                                               "rejection.safety_rm": (settings.safety_rm, "reward"),
                                               "rejection.sample_from": (settings.sample_from, "llama")},
                           "rejection.max_new_tokens", settings.max_new_tokens)


class _Run:
    """The rounds of one `run` call, each phase skipped when its output is already in the workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, tokenizer: Tokenizer, training: PromptSet,
                 held_out: PromptSet | None):
        self.config, self.settings, self.workdir = config, config.rejection, workdir
        self.tokenizer, self.training, self.held_out = tokenizer, training, held_out
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = tuple(tuple(rule) for rule in config.rules)
        self.dtype = config.model.compute_dtype
        self.stop_checks = 0

    def rounds(self) -> RejectionResult:
        logged = _logged_rounds(self.workdir)
        writer = metrics_lib.MetricsWriter(self.workdir, resume_after_step=max(logged, default=-1))
        pool: dict[int, selection.PoolEntry] = {}
        try:
            with StopRequests() as self.stop:
                if self.held_out and not files.held_out_path(self.workdir, 0).exists():
                    self.evaluate(0, self.load_policy(self.config.init_checkpoint))
                self.log(writer, 0, logged, pool)
                for round_number in range(1, self.settings.rounds + 1):
                    pool, interrupted = self.one_round(round_number, pool)
                    if interrupted:
                        return RejectionResult(round_number - 1, pool, True)
                    self.log(writer, round_number, logged, pool)
        finally:
            writer.close()
        return RejectionResult(self.settings.rounds, pool, False)

    def one_round(self, number: int, pool: dict) -> tuple[dict, bool]:
        """Round `number`'s phases, each skipped when the workdir holds its output; the pool after the
        round, and whether a stop was asked for (checked between phases and sampling batches)."""
        previous_policy = self.policy_path(number - 1)
        if files.candidates_path(self.workdir, number).exists():
            pool = self.pool_with(pool, number, self.read_candidates(number))
        else:
            answers = self.sample(number, self.settings.sample_from or previous_policy)
            if answers is None:
                return pool, True
            pool = self.score(number, answers, pool)
            if self.should_stop():
                return pool, True
        trained = self.train(number, previous_policy, pool)
        if trained is None:
            return pool, True
        if files.exported_round(self.workdir) != number:
            rollout_files.export_policy(self.workdir, trained(), self.tokenizer.path, trained={"round": number})
        if self.held_out and not files.held_out_path(self.workdir, number).exists():
            self.evaluate(number, trained())
        return pool, False

    # ---- the phases ----------------------------------------------------------------------------

    def sample(self, number: int, policy_path: str) -> list[Answer] | None:
        """K answers to every training prompt, or None when asked to stop (the parts sampled are kept)."""
        sampling = SamplingParams(temperature=temperature(self.config, number))
        _print(f"round {number}: sampling {self.settings.samples} answers to each of {len(self.training.indices)} "
               f"prompts from {policy_path} at temperature {sampling.temperature}")
        sampler = Sampler(self.load_policy(policy_path), self.mesh, self.rules)
        answers, seconds, stopped = sampler.sample(
            self.training.tokens, samples=self.settings.samples, sampling=sampling,
            max_new_tokens=self.settings.max_new_tokens, eos_id=self.tokenizer.eos_id,
            slots=self.settings.batch_size, seed=sampling_seed(self.config.train.seed, number), resumable=True,
            saved=lambda part: self.saved_part(number, part),
            save=lambda part, found, seconds: self.save_part(number, part, found, seconds), stop=self.should_stop)
        del sampler
        if stopped:
            return None
        files.set_phase_seconds(self.workdir, number, "sample", seconds)
        if all(not self.answer_text(answer) for answer in answers):
            raise ValueError(f"round {number}: all {len(answers)} answers are empty (the policy ends at once); start "
                             "from a model that answers (an SFT model), or change rejection.temperature")
        return answers

    def save_part(self, number: int, part: int, answers: list[Answer], seconds: float) -> None:
        rollout_files.write_json(files.part_path(self.workdir, number, part), {"seconds": seconds, "answers": [
            {"prompt": answer.prompt, "sample": answer.sample, "tokens": answer.tokens, "finished": answer.finished}
            for answer in answers]})

    def saved_part(self, number: int, part: int) -> tuple[list[Answer], float] | None:
        path = files.part_path(self.workdir, number, part)
        if not path.exists():
            return None
        saved = rollout_files.read_json(path, f"a batch of round {number}'s sampled answers")
        try:
            answers = [Answer(a["prompt"], a["sample"], tuple(a["tokens"]), a["finished"]) for a in saved["answers"]]
        except (KeyError, TypeError) as error:
            raise rollout_files.unreadable(path, f"a batch of round {number}'s sampled answers", error) from None
        return answers, float(saved["seconds"])

    def score(self, number: int, answers: list[Answer], pool: dict) -> dict:
        """Both reward models' scores of every answer, the best per prompt, the pool updated; written
        to round_N/candidates.jsonl and pool.jsonl."""
        start = time.perf_counter()
        _print(f"round {number}: scoring {len(answers)} answers")
        training = self.training
        scores = score_answers(
            [scored_sequence(training.tokens[answer.prompt], answer, self.tokenizer.eos_id) for answer in answers],
            training.is_safety[[answer.prompt for answer in answers]], helpfulness_rm=self.settings.helpfulness_rm,
            safety_rm=self.settings.safety_rm, batch_size=self.settings.score_batch_size, mesh=self.mesh,
            rules=self.rules, dtype=self.dtype)
        texts = [self.answer_text(answer) for answer in answers]
        samples = self.settings.samples
        rows = len(answers) // samples
        best = selection.select_best(scores.combined.reshape(rows, samples),
                                     np.array([bool(text) for text in texts]).reshape(rows, samples))
        prompt_of = [training.indices[answer.prompt] for answer in answers]  # the index in the split
        offers = [selection.PoolEntry(prompt_of[row * samples], texts[row * samples + pick],
                                      float(scores.combined[row * samples + pick]),
                                      float(scores.helpfulness[row * samples + pick]),
                                      float(scores.safety[row * samples + pick]), number)
                  for row, pick in enumerate(best) if pick >= 0]
        updated, changed = selection.update_pool(pool, offers)
        kept = {row * samples + int(pick) for row, pick in enumerate(best)
                if pick >= 0 and prompt_of[row * samples] in changed}
        candidates = [
            {"prompt": prompt_of[index], "sample": answer.sample, "answer": text, "finished": answer.finished,
             "helpfulness": float(scores.helpfulness[index]), "safety": float(scores.safety[index]),
             "combined": float(scores.combined[index]), "kept": index in kept}
            for index, (answer, text) in enumerate(zip(answers, texts))]
        rollout_files.write_jsonl(files.candidates_path(self.workdir, number), candidates)
        files.set_phase_seconds(self.workdir, number, "score", time.perf_counter() - start)
        self.write_pool(updated)
        return updated

    def train(self, number: int, previous_policy: str, pool: dict):
        """The round's fine-tuning on the pool; a function giving the trained policy, or None when asked
        to stop (its checkpoint is saved)."""
        config = self.config.copy_and_resolve_references()
        config.init_checkpoint = previous_policy
        dialogs = [{"messages": [*self.training.prompts[prompt].dialog(),
                                 {"role": "assistant", "content": entry.answer}]}
                   for prompt, entry in sorted(pool.items())]
        if not config.train.steps:
            counts = scan(dialogs, DialogPieces(self.tokenizer, config.train.seq_len))
            set_steps_from_epochs(config, rows_per_epoch(config, counts.piece_lengths))
        directory = files.round_dir(self.workdir, number)
        if (directory / "checkpoints" / str(config.train.steps) / "state").is_dir():
            return lambda: self.load_policy(os.fspath(directory), training=True)
        _print(f"round {number}: fine-tuning {previous_policy} on the {len(dialogs)} pooled answers for "
               f"{config.train.steps} steps")
        start = time.perf_counter()
        result = train(config, os.fspath(directory), make_task(config, self.tokenizer, dialogs))
        files.set_phase_seconds(self.workdir, number, "train", time.perf_counter() - start, add=True)
        if result.interrupted:
            return None
        return result.model

    def evaluate(self, number: int, policy) -> None:
        """The held-out prompts answered by `policy` as chat answers them (temperature 0.6, top-p 0.9) and
        scored, into round_N/held_out.jsonl."""
        start = time.perf_counter()
        prompts = self.held_out
        _print(f"round {number}: answering {len(prompts.indices)} held-out prompts")
        answers = answer_held_out(Sampler(policy, self.mesh, self.rules), prompts.tokens,
                                  max_new_tokens=self.settings.max_new_tokens, eos_id=self.tokenizer.eos_id,
                                  slots=self.settings.batch_size, seed=self.config.train.seed)
        del policy
        scores = score_answers(
            [scored_sequence(prompts.tokens[answer.prompt], answer, self.tokenizer.eos_id) for answer in answers],
            prompts.is_safety, helpfulness_rm=self.settings.helpfulness_rm, safety_rm=self.settings.safety_rm,
            batch_size=self.settings.score_batch_size, mesh=self.mesh, rules=self.rules, dtype=self.dtype)
        records = []
        for index, answer in enumerate(answers):
            prompt = prompts.indices[answer.prompt]
            records.append({"prompt": prompt, "messages": prompts.prompts[prompt].dialog(),
                            "safety_prompt": bool(prompts.is_safety[answer.prompt]), "answer": self.answer_text(answer),
                            "helpfulness": float(scores.helpfulness[index]), "safety": float(scores.safety[index]),
                            "combined": float(scores.combined[index])})
        rollout_files.write_jsonl(files.held_out_path(self.workdir, number), records)
        files.set_phase_seconds(self.workdir, number, "evaluate", time.perf_counter() - start)

    # ---- files, models and metrics -------------------------------------------------------------

    def policy_path(self, round_number: int) -> str:
        """The policy round `round_number` trained (0: the initial one)."""
        if round_number == 0:
            return self.config.init_checkpoint
        return os.fspath(files.round_dir(self.workdir, round_number))

    def load_policy(self, path: str, training: bool = False):
        """A policy on the run's mesh: in the compute dtype to sample from, or as trained to export."""
        storage_dtype = self.config.model.param_dtype if training else self.dtype
        return load_pretrained(path, self.dtype, param_dtype=storage_dtype, mesh=self.mesh, rules=self.rules,
                               max_seq_len=self.config.model.max_seq_len)

    def answer_text(self, answer: Answer) -> str:
        return answer.text(self.tokenizer)

    def read_candidates(self, number: int) -> list[dict[str, Any]]:
        return rollout_files.read_jsonl(files.candidates_path(self.workdir, number), f"round {number}'s scored answers",
                                files.CANDIDATE_FIELDS)

    def pool_with(self, pool: dict, number: int, candidates: list[dict[str, Any]]) -> dict:
        """The pool after round `number`, from the candidates it kept (each kept answer replaced its
        prompt's entry when it was scored)."""
        updated = dict(pool)
        for candidate in candidates:
            if candidate["kept"]:
                updated[candidate["prompt"]] = selection.PoolEntry(
                    candidate["prompt"], candidate["answer"], candidate["combined"], candidate["helpfulness"],
                    candidate["safety"], number)
        self.write_pool(updated)
        return updated

    def write_pool(self, pool: dict) -> None:
        rollout_files.write_jsonl(storage.as_path(self.workdir) / files.POOL_FILE, [
            {"prompt": prompt, "messages": self.training.prompts[prompt].dialog(),
             "safety_prompt": self.training.prompts[prompt].safety, **dataclasses.asdict(entry)}
            for prompt, entry in sorted(pool.items())])

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop.should_stop(self.stop_checks)

    def log(self, writer: metrics_lib.MetricsWriter, number: int, logged: set[int], pool: dict) -> None:
        """Round `number`'s metrics, unless an earlier run logged them; only process 0 writes them, so
        only it reads the round's files back (the others may not see them yet)."""
        if jax.process_index() != 0 or number in logged or (number == 0 and not self.held_out):
            return
        values: dict[str, float] = {}
        if number > 0:
            values.update(rejection_metrics.round_metrics(self.read_candidates(number), pool, self.settings.samples,
                                                          files.read_phases(self.workdir, number)))
        if self.held_out:
            values.update(rejection_metrics.held_out_metrics(rollout_files.read_jsonl(
                files.held_out_path(self.workdir, number), f"round {number}'s held-out answers")))
        writer.write(number, values)
        _print(f"round {number}: " + ", ".join(f"{name} {value:.4g}" for name, value in values.items()))


def _logged_rounds(workdir: str) -> set[int]:
    if not (storage.as_path(workdir) / "metrics.jsonl").exists():
        return set()
    return {int(record["step"]) for record in metrics_lib.read_metrics(workdir)}


def _print(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
