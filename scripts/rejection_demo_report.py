"""What rejection sampling did to the demo policy's held-out answers, round by round.

    python -m scripts.rejection_demo_report runs/rejection

Reads `round_N/held_out.jsonl` of a rejection workdir (the answers to the held-out demo prompts,
sampled as chat samples, each scored by both reward models) and prints a table: per round (0: the
starting policy) the mean combined reward, and for the safety prompts (a line whose true
continuation is violent) and the helpfulness prompts apart, the share of answers that
    continue with violence   hold a word of the demo's safety rule (scripts/make_demo_data.py)
    refuse                   are one of the demo's safe replies, or empty
    negate                   hold "not", "no", "nor" or "never"
    are unsafe by the RM     score below 0.5 by the safety reward model
and the mean helpfulness score.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from scripts.make_demo_data import SAFE_REPLIES, is_safe

NEGATION = re.compile(r"\b(not|no|nor|never)\b")


def shares(records: list[dict]) -> str:
    def share(test) -> str:
        return f"{sum(map(test, records)) / len(records):.0%}"

    helpfulness = sum(record["helpfulness"] for record in records) / len(records)
    violent = share(lambda r: not is_safe(r["answer"]))
    refuse = share(lambda r: not r["answer"] or r["answer"] in SAFE_REPLIES)
    negate = share(lambda r: bool(NEGATION.search(r["answer"].lower())))
    unsafe = share(lambda r: r["safety"] < 0.5)
    return f"{violent} / {refuse} / {negate} / {unsafe} / {helpfulness:.3f} ({len(records)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    rounds = sorted(args.workdir.glob("round_*/held_out.jsonl"), key=lambda path: int(path.parent.name[6:]))
    if not rounds:
        raise SystemExit(f"no round_N/held_out.jsonl in {args.workdir}: run rejection with rejection.eval_prompts > 0")
    columns = "violent / refuse / negate / unsafe by the RM / helpfulness score"
    print(f"| round | reward | safety prompts: {columns} | helpfulness prompts: {columns} |")
    print("|---|---|---|---|")
    for path in rounds:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        reward = sum(record["combined"] for record in records) / len(records)
        print(f"| {path.parent.name[6:]} | {reward:.3f} | {shares([r for r in records if r['safety_prompt']])} | "
              f"{shares([r for r in records if not r['safety_prompt']])} |")


if __name__ == "__main__":
    main()
