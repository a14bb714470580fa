"""Build the bundled multiple-choice task `llama2_jax/assets/demo/next_line_choice.jsonl`.

    python -m scripts.make_eval_task

From the documents of the bundled corpus's held-out split (the text pretraining never trains on):
the context is a line of verse or prose, the right choice the line that follows it, and the other
three choices that same line with its words shuffled. A model that has learnt the language prefers
the real line; one that has not is at chance (25 %). Seeded: a rerun writes the same bytes.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from llama2_jax.data import sources

OUT = Path(__file__).resolve().parent.parent / "llama2_jax" / "assets" / "demo" / "next_line_choice.jsonl"
SEED = 2023
EXAMPLES = 400
WRONG_CHOICES = 3
MIN_WORDS = 6


def line_pairs(text: str) -> list[tuple[str, str]]:
    """(line, next line) of consecutive text lines of one paragraph, both long enough to shuffle."""
    pairs = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines()]
        for line, following in zip(lines, lines[1:]):
            if len(line.split()) >= MIN_WORDS and len(following.split()) >= MIN_WORDS and not following.isupper():
                pairs.append((line, following))
    return pairs


def shuffled(line: str, rng: random.Random) -> str:
    words = line.split()
    while True:
        rng.shuffle(words)
        if " ".join(words) != line:
            return " ".join(words)


def main() -> None:
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as data_dir:
        source = sources.data_source(sources.bundled_dataset("shakespeare", data_dir), "validation")
        pairs = [pair for index in range(len(source)) for pair in line_pairs(source[index]["text"].decode())]
    rows = []
    for context, answer_line in rng.sample(pairs, EXAMPLES):
        wrong = []
        while len(wrong) < WRONG_CHOICES:
            candidate = shuffled(answer_line, rng)
            if candidate not in wrong:
                wrong.append(candidate)
        answer = rng.randrange(WRONG_CHOICES + 1)
        choices = wrong[:answer] + [answer_line] + wrong[answer:]
        rows.append(json.dumps({"context": context, "choices": choices, "answer": answer}, ensure_ascii=False))
    OUT.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} examples from {len(pairs)} line pairs of the held-out split to {OUT}")


if __name__ == "__main__":
    main()
