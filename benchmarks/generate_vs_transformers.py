"""Sampling speed beside transformers' `generate`, the same weights in both, on this machine's CPU.

A random Llama (vocab 32000, dim 512, 8 layers, 8 heads, FFN 1536: about 40M parameters) is made
and saved by transformers, loaded by `llama2_jax.load_pretrained`, and both sample from it in
float32: a 64-token prompt and 128 new tokens, EOS never ending a row, greedy. Printed per batch
size: new tokens/s of ours and of transformers with its dynamic and its static cache, the ratio
to transformers' faster one, and the share of greedy tokens on which the two agree. Torch gets 2
threads. Run it on an idle machine: under load torch's threads lose more than XLA's and the ratio
moves in our favour. Needs `pip install torch transformers` beside the package.

    python benchmarks/generate_vs_transformers.py --batches 1 16 64 --repeats 3
"""

import argparse
import json
import tempfile
import time

import numpy as np


def best_time(function, repeats: int) -> float:
    """Best wall time of `repeats` calls after one untimed call (compilation, warm caches)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    directory = tempfile.mkdtemp()
    reference.save_pretrained(directory, safe_serialization=True)

    import jax
    import jax.numpy as jnp

    import llama2_jax
    from llama2_jax import generate

    ours = llama2_jax.load_pretrained(directory, dtype=jnp.float32, param_dtype=jnp.float32, max_seq_len=512)
    decoding_state = generate.decoding_layout(ours)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "jax": jax.__version__}))
    for batch in args.batches:
        prompts = np.random.default_rng(batch).integers(3, 32000, (batch, args.prompt))
        prompt_ids = torch.tensor(prompts)

        def sample_ours():
            return np.asarray(generate.generate(ours, prompts.tolist(), max_new_tokens=args.new, eos_id=-1,
                                                decoding_state=decoding_state).tokens)

        def sample_reference(cache_implementation):
            def run():
                with torch.inference_mode():
                    options = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
                    if cache_implementation:
                        options["cache_implementation"] = cache_implementation
                    return reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **options)
            return run

        agreement = float((sample_ours() == sample_reference(None)().numpy()[:, args.prompt:]).mean())
        tokens = batch * args.new
        figures = {
            "batch": batch,
            "ours_tokens_per_s": tokens / best_time(sample_ours, args.repeats),
            "transformers_dynamic_tokens_per_s": tokens / best_time(sample_reference(None), args.repeats),
            "transformers_static_tokens_per_s": tokens / best_time(sample_reference("static"), args.repeats),
            "greedy_token_agreement": agreement,
        }
        figures["ratio"] = figures["ours_tokens_per_s"] / max(figures["transformers_dynamic_tokens_per_s"],
                                                              figures["transformers_static_tokens_per_s"])
        print(json.dumps({key: round(value, 3) for key, value in figures.items()}), flush=True)


if __name__ == "__main__":
    main()
