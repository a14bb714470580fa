"""The demo's instruction prompts: the bundled prompts, each with a Ghost Attention instruction.

    python -m scripts.make_instruction_prompts

Reads `llama2_jax/assets/demo/prompts_{train,validation}.jsonl` and writes
`instruction_prompts_{train,validation}.jsonl` beside them (the bundled dataset
`shakespeare_instruction_prompts`): every prompt's user message with an instruction appended as
`gatt` appends one (`InstructionSet.append_to`: a character to answer as, a play to name, or both,
half in the short form), drawn with a fixed seed per split. An answer follows it or not by a plain
test, so `llama2_jax.data.instructions:follows_instruction` is a verifiable reward for GRPO, and the
share of held-out answers that follow is an instruction-following rate.
"""

from __future__ import annotations

import json
import random

from llama2_jax.data.config import DEMO_DATA_DIR
from llama2_jax.data.instructions import InstructionSet, load_characters_and_plays

SEEDS = {"train": 11, "validation": 12}


def main() -> None:
    characters, plays = load_characters_and_plays()
    for split, seed in SEEDS.items():
        rng = random.Random(seed)
        records = [json.loads(line) for line in (DEMO_DATA_DIR / f"prompts_{split}.jsonl").read_text().splitlines()]
        for record in records:
            first_user = next(message for message in record["messages"] if message["role"] == "user")
            first_user["content"] = InstructionSet.sample(rng, characters, plays).append_to(first_user["content"])
        path = DEMO_DATA_DIR / f"instruction_prompts_{split}.jsonl"
        path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
        print(f"wrote {len(records)} prompts to {path}")


if __name__ == "__main__":
    main()
