"""Sampling K answers per prompt, as rejection sampling, PPO and GRPO do: continuous batching
(llama2_jax.rollout.engine) beside our static batches and transformers' `generate`, the same
weights in all three, on this machine's CPU.

A trained checkpoint (default runs/sft, the demo's SFT policy) answers the demo's chat prompts
(llama2_jax/assets/demo/prompts_validation.jsonl, in the chat format), K answers each, temperature
1, no top-k or top-p, EOS ending an answer, up to `--new` new tokens. Per batch size B (rows
decoded together):

    continuous    engine.sample with B slots, refilled as answers end
    static        generate.generate with samples=K on B // K prompts a call, prompts sorted by
                  length: how the stages sampled before continuous batching
    transformers  LlamaForCausalLM.generate(num_return_sequences=K, do_sample=True) on B // K
                  prompts a call (left-padded), the checkpoint exported to HF format

Printed per batch size: answers (samples) per second and new tokens per second (EOS counted) of
each, the mean answer length each drew, and whether continuous and static gave the same tokens
(they draw each answer from the same key: they agree up to float rounding). Each figure is one
timed pass over all prompts after an untimed one (compilation, warm caches; for transformers, one
call). Torch gets 2 threads.
Needs torch and transformers beside the package.

    python benchmarks/rollout_vs_transformers.py --checkpoint runs/sft --batches 16 64
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's own package


def timed(function, warm_up):
    """The result and wall time of one call, after `warm_up()` (compilation, warm caches)."""
    warm_up()
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/sft")
    parser.add_argument("--prompts", type=int, default=64, help="how many demo prompts to answer")
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt (K)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new", type=int, default=128, help="most new tokens per answer")
    parser.add_argument("--refill-at", type=int, default=1, help="continuous: ended answers that trigger a refill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    import llama2_jax
    from llama2_jax import generate
    from llama2_jax.checkpoint.convert import export_model
    from llama2_jax.data.prompts import read_prompts
    from llama2_jax.data.tokenizer import Tokenizer
    from llama2_jax.rollout import engine

    tokenizer_path = os.path.join(args.checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    demo = os.path.join(os.path.dirname(llama2_jax.__file__), "assets", "demo", "prompts_validation.jsonl")
    prompts = [prompt.tokens(tokenizer) for prompt in read_prompts(demo)[:args.prompts]]
    ours = llama2_jax.load_pretrained(args.checkpoint, jnp.float32, param_dtype=jnp.float32)
    decoding_state = generate.decoding_layout(ours)
    sampling = generate.SamplingParams(temperature=1.0)
    eos, K = tokenizer.eos_id, args.samples
    print(json.dumps({"checkpoint": args.checkpoint, "prompts": len(prompts), "samples": K, "new": args.new,
                      "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "jax": jax.__version__,
                      "devices": str(jax.devices()), "load": os.getloadavg()}), flush=True)

    def continuous(batch):
        answers = engine.sample(ours, prompts, samples=K, max_new_tokens=args.new, eos_id=eos, slots=batch,
                                    sampling=sampling, seed=args.seed, refill_at=args.refill_at,
                                    decoding_state=decoding_state)
        return [list(answer.tokens) for answer in answers]

    def static(batch):
        order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
        per_call = max(1, batch // K)
        answers = [None] * (len(prompts) * K)
        for start in range(0, len(order), per_call):
            indices = order[start:start + per_call]
            output = generate.generate(ours, [prompts[i] for i in indices], samples=K, max_new_tokens=args.new,
                                       eos_id=eos, sampling=sampling, seed=args.seed, prompt_ids=indices,
                                       decoding_state=decoding_state)
            for row, tokens in enumerate(output.token_lists()):
                answers[indices[row // K] * K + row % K] = tokens
        return answers

    runners = {"continuous": continuous, "static": static}
    if not args.skip_transformers:
        runners["transformers"] = _transformers_runner(ours, export_model, prompts, K, args.new, eos)

    rows = []
    for batch in args.batches:
        # Ours compile a program per bucket: a whole untimed pass meets every one. Torch has nothing to compile.
        warm_ups = {"transformers": lambda: runners["transformers"](batch, prompt_count=max(1, batch // K))}
        results = {name: timed(lambda run=run: run(batch), warm_ups.get(name, lambda run=run: run(batch)))
                   for name, run in runners.items()}
        same = sum(a == b for a, b in zip(results["continuous"][0], results["static"][0])) / (len(prompts) * K)
        for name, (answers, seconds) in results.items():
            new_tokens = sum(map(len, answers))
            row = {"batch": batch, "sampler": name, "samples_per_s": len(answers) / seconds,
                   "new_tokens_per_s": new_tokens / seconds, "mean_answer": new_tokens / len(answers),
                   "seconds": seconds}
            rows.append(row)
            print(json.dumps({key: round(value, 3) if isinstance(value, float) else value
                              for key, value in row.items()}), flush=True)
        print(json.dumps({"batch": batch, "continuous_equals_static": round(same, 4), "load": os.getloadavg()}),
              flush=True)

    print(f"\n{'batch':>5}  {'sampler':<12}  {'samples/s':>9}  {'tokens/s':>9}  {'mean len':>8}  {'vs static':>9}  "
          f"{'vs transformers':>15}")
    for row in rows:
        same_batch = {other["sampler"]: other for other in rows if other["batch"] == row["batch"]}
        ratio = lambda name: (f"{row['samples_per_s'] / same_batch[name]['samples_per_s']:.2f}x"  # noqa: E731
                              if name in same_batch else "-")
        print(f"{row['batch']:>5}  {row['sampler']:<12}  {row['samples_per_s']:>9.1f}  "
              f"{row['new_tokens_per_s']:>9.0f}  {row['mean_answer']:>8.1f}  {ratio('static'):>9}  "
              f"{ratio('transformers'):>15}")


def _transformers_runner(ours, export_model, prompts, samples: int, new: int, eos: int):
    """transformers' sampler on our weights, exported to HF format: B // K prompts a call, left-padded."""
    import torch
    import transformers

    torch.set_num_threads(2)
    directory = tempfile.mkdtemp()
    export_model(ours, directory, "hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}), flush=True)

    def run(batch, prompt_count=len(prompts)):
        torch.manual_seed(0)
        per_call = max(1, batch // samples)
        order = sorted(range(prompt_count), key=lambda index: len(prompts[index]))
        answers = [None] * (len(prompts) * samples)
        for start in range(0, len(order), per_call):
            indices = order[start:start + per_call]
            width = max(len(prompts[i]) for i in indices)
            ids = torch.zeros((len(indices), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, index in enumerate(indices):
                ids[row, width - len(prompts[index]):] = torch.tensor(prompts[index])
                mask[row, width - len(prompts[index]):] = 1
            with torch.inference_mode():
                output = reference.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                            top_p=1.0, num_return_sequences=samples, max_new_tokens=new,
                                            eos_token_id=eos, pad_token_id=0)
            for row, sequence in enumerate(output[:, width:].tolist()):
                answer = sequence[:sequence.index(eos) + 1] if eos in sequence else sequence
                answers[indices[row // samples] * samples + row % samples] = answer
        return answers

    return run


if __name__ == "__main__":
    main()
