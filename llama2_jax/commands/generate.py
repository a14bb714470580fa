"""`python -m llama2_jax generate`: completions for a file of prompts, written as JSON lines.

    python -m llama2_jax generate --checkpoint DIR --prompts prompts.txt --out completions.jsonl

The prompts file is plain text, one prompt per line (blank lines are skipped), or JSON lines
(`.jsonl`) whose objects hold either `"prompt"` (text continued as is) or `"messages"` (a dialog up
to its last user turn, encoded in the Llama 2 chat format and answered as the assistant), read by
llama2_jax/data/prompts.py. Each output line holds the prompt's index, the prompt, the completion
text, its tokens, their log-probs under the model and whether it ended with EOS (`finished`) or at
the token limit.

Prompts are sorted by length and generated in batches, so each batch pads little; the output keeps
the input order. `--checkpoint` is anything `load_pretrained` reads: an exported checkpoint, a
training workdir (its newest step), Meta or Hugging Face weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax

from llama2_jax.cli import ArgumentParser, print_phase, reports_errors
from llama2_jax.commands.model_flags import add_model_flags, load_for_sampling
from llama2_jax.data.prompts import read_prompts
from llama2_jax.generate import SamplingParams
from llama2_jax.rollout.sampler import complete


@reports_errors
def main(argv: Sequence[str]) -> int:
    """CLI entry point."""
    parser = ArgumentParser(prog="python -m llama2_jax generate", description=__doc__)
    add_model_flags(parser, temperature=0.6, top_p=0.9)
    parser.add_argument("--prompts", required=True, help="text file (one prompt a line) or .jsonl")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="answers decoding together (refilled as they end)")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_sampling(args)
    prompts = read_prompts(args.prompts)
    texts = [prompt.text if prompt.text is not None else json.dumps(prompt.dialog(), ensure_ascii=False)
             for prompt in prompts]
    token_ids = []
    for number, prompt in enumerate(prompts, start=1):
        try:
            token_ids.append(prompt.tokens(tokenizer))
        except ValueError as error:
            raise ValueError(f"{args.prompts}: prompt {number}: {error}") from None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    print_phase(f"completing {len(token_ids)} prompts, up to {args.max_new_tokens} tokens each")
    results = complete(model, tokenizer, token_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       seed=args.seed, batch_size=args.batch_size)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:
            for index, (text, result) in enumerate(zip(texts, results)):
                new_text = tokenizer.decode(list(result.tokens[:-1] if result.finished else result.tokens))
                record = {"index": index, "prompt": text, "completion": new_text, "tokens": list(result.tokens),
                          "log_probs": [round(value, 6) for value in result.log_probs], "finished": result.finished}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} completions to {args.out}")
    return 0
