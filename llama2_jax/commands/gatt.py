"""`python -m llama2_jax gatt`: build Ghost Attention training dialogs with the current policy.

    python -m llama2_jax gatt --checkpoint runs/sft --out runs/gatt_dialogs.jsonl
    python -m llama2_jax sft --config=configs/sft.py:tiny,gatt --workdir=runs/gatt

For each multi-turn dialog of `--dialogs` (default: the bundled demo's) an instruction is drawn (a
character to answer as, a play to name, or both; half in the short form); the policy answers every
turn with the instruction appended to each user turn (`--samples` answers sampled, the first that
follows the instruction kept; with `--reward-models`, the one of those that follow with the best
combined reward, as the paper samples GAtt data from its latest RLHF model "analogous to rejection
sampling"); the output keeps the instruction in the first user turn only and trains only the last
answer of each example (llama2_jax/data/gatt.py). The policy may be any checkpoint: the recipe uses
the rejection-sampling policy. The output is chat JSON
lines, ready for `sft` (configs/sft.py's `gatt` round reads runs/gatt_dialogs.jsonl from runs/sft).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence

import jax
import numpy as np

from llama2_jax import reward
from llama2_jax.cli import ArgumentParser, UsageError, print_phase, reports_errors
from llama2_jax.commands.model_flags import add_model_flags, load_for_sampling
from llama2_jax.data.gatt import Conversation, converse, followed_turns, split_dialog, training_dialogs
from llama2_jax.data.instructions import DEMO_DATA_DIR, InstructionSet, load_characters_and_plays
from llama2_jax.data.records import jsonl_records, parse_chat_record
from llama2_jax.generate import SamplingParams
from llama2_jax.rollout.sampler import answers_to_dialogs


def read_dialogs(path: str) -> list[list[dict]]:
    """The dialogs of a chat JSONL file (each line checked like a dataset's)."""
    return [parse_chat_record(record)["messages"] for _, _, record in jsonl_records([path], named_by="--dialogs")]


def conversations(dialogs: Sequence[Sequence[dict]], seed: int, every_turn: bool) -> list[Conversation]:
    """One conversation per dialog with an instruction drawn for it (the same ones for a seed)."""
    rng = random.Random(seed)
    characters, plays = load_characters_and_plays()
    result = []
    for dialog in dialogs:
        system, users = split_dialog(dialog)
        result.append(Conversation(system, users, InstructionSet.sample(rng, characters, plays), every_turn))
    return result


def answer_with(model, tokenizer, args, samples: int = 1, reward_models: Sequence = ()):
    """`converse`'s answer function: the model's answer to each conversation's turn. With `samples`
    > 1, that many answers are sampled and, of those that follow the instruction, the first is kept,
    or with `reward_models` the best by their combined reward (none follows: the first sampled): a
    small policy that follows an instruction only some of the time still yields data."""
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def answer(conversations, turn: int) -> list[str]:
        print_phase(f"turn {turn}: answering {len(conversations)} dialogs"
                    + (f", {samples} sampled answers each" if samples > 1 else ""))
        dialogs = [conversation.messages(turn) for conversation in conversations]
        candidates = answers_to_dialogs(model, tokenizer, dialogs, max_new_tokens=args.answer_tokens, samples=samples,
                                        sampling=sampling, seed=args.seed + 1000 * turn, batch_size=args.batch_size)
        following = [[reply for reply in replies if conversation.instruction.followed_by(reply)]
                     for conversation, replies in zip(conversations, candidates)]
        if not reward_models:
            return [kept[0] if kept else replies[0] for kept, replies in zip(following, candidates)]
        scored = [(row, reply) for row, kept in enumerate(following) for reply in kept]
        rewards = reward.combined_scores(reward_models, tokenizer, [dialogs[row] for row, _ in scored],
                                         [reply for _, reply in scored]) if scored else []
        return [best_reply(kept, [value for (row, _), value in zip(scored, rewards) if row == index], replies[0])
                for index, (kept, replies) in enumerate(zip(following, candidates))]

    return answer


def best_reply(following: Sequence[str], rewards: Sequence[float], fallback: str) -> str:
    """The reply with the highest reward among those that follow the instruction (the first on a tie;
    a NaN reward, a pair too long to score, never wins over a number); `fallback` when none follows."""
    if not following:
        return fallback
    order = sorted(range(len(following)), key=lambda index: (-np.nan_to_num(rewards[index], nan=-np.inf), index))
    return following[order[0]]


def add_conversation_flags(parser: ArgumentParser, dialogs: str, temperature: float, many: bool = False) -> None:
    add_model_flags(parser, temperature=temperature, top_p=0.9, many=many)
    parser.add_argument("--dialogs", default=str(DEMO_DATA_DIR / dialogs),
                        help=f"multi-turn chat JSONL whose user turns are used (default: the bundled {dialogs})")
    parser.add_argument("--answer-tokens", type=int, default=48, help="longest answer per turn")
    parser.add_argument("--batch-size", type=int, default=64, help="answers decoding together (refilled as they end)")


@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax gatt", description=__doc__)
    add_conversation_flags(parser, "gatt_dialogs_train.jsonl", temperature=0.6)
    parser.add_argument("--out", required=True, help="output chat JSONL")
    parser.add_argument("--limit", type=int, default=0, help="the first N dialogs only (0: all)")
    parser.add_argument("--samples", type=int, default=4,
                        help="answers sampled per turn; the first that follows the instruction is kept")
    parser.add_argument("--reward-models", nargs="+", metavar="RM", default=(),
                        help="a helpfulness reward model and, optionally, a safety one: keep the sampled answer "
                        "that follows the instruction with the best combined reward, not the first")
    args = parser.parse_args(argv)
    if len(args.reward_models) > 2:
        raise UsageError("--reward-models takes a helpfulness reward model and at most one safety reward model")
    model, tokenizer = load_for_sampling(args)
    reward_models = reward.load_reward_models(args.reward_models, tokenizer, flag="--reward-models")
    dialogs = conversations(read_dialogs(args.dialogs)[: args.limit or None], args.seed, every_turn=True)
    converse(dialogs, answer_with(model, tokenizer, args, args.samples, reward_models), tokenizer,
             model.config.max_seq_len, args.answer_tokens)
    examples = [example for conversation in dialogs for example in training_dialogs(conversation)]
    answered = sum(len(conversation.answers) for conversation in dialogs)
    followed = sum(followed_turns(conversation) for conversation in dialogs)
    if jax.process_index() == 0:
        with open(args.out, "w", encoding="utf-8") as out:
            for messages in examples:
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        print(f"{len(dialogs)} dialogs, {answered} turns answered with the instruction in every turn, "
              f"{followed} of them in a row following it from the first: wrote {len(examples)} "
              f"training dialogs to {args.out}")
        if not examples:
            print("no answer followed the instruction from the first turn: sample more answers per turn (--samples) "
                  "or start from a policy that follows instructions more often (a longer SFT)", file=sys.stderr)
    return 0
