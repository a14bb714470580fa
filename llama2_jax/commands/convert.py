"""`python -m llama2_jax convert --from meta|hf|orbax|peft --to meta|hf|orbax|peft SRC DST`.

    python -m llama2_jax convert --from meta  --to hf    llama-2-7b/     llama-2-7b-hf/
    python -m llama2_jax convert --from orbax --to meta  runs/tiny/      tiny-meta/ --shards 2
    python -m llama2_jax convert --from orbax --to peft  runs/sft-lora/  sft-adapters/
    python -m llama2_jax convert --from peft  --to hf    sft-adapters/   sft-merged-hf/ --base llama-2-7b-hf/

A run that trained low-rank adapters converts as its merged model (its base read from where the run
read it), or `--to peft` as its adapters alone in peft's layout (checkpoint/peft.py); `--from peft`
merges someone's adapters into `--base` for any target.

Streams tensor by tensor (llama2_jax/checkpoint/convert.py); needs neither PyTorch nor safetensors.
The source's `tokenizer.model` goes along; an hf target then also holds `tokenizer_config.json` (with
the Llama 2 chat template), `special_tokens_map.json` and, for a language model,
`generation_config.json`, so transformers' `AutoTokenizer`, `apply_chat_template` and `generate`
work on it as this project does (llama2_jax/checkpoint/hf_tokenizer.py).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence

from llama2_jax.checkpoint import hf
from llama2_jax.checkpoint.convert import DTYPES, convert
from llama2_jax.checkpoint.load import FORMATS
from llama2_jax.cli import ArgumentParser, reports_errors

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '100000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])



@reports_errors
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="python -m llama2_jax convert", description=__doc__)
    parser.add_argument("--from", dest="source_format", choices=(*FORMATS, "peft"), required=True)
    parser.add_argument("--to", dest="target_format", choices=(*FORMATS, "peft"), required=True)
    parser.add_argument("source", metavar="SRC", help="checkpoint directory to read")
    parser.add_argument("target", metavar="DST", help="new directory to write (must not hold files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the source dtype)")
    parser.add_argument("--shards", type=int, default=1, help="meta: number of model-parallel files to split into")
    parser.add_argument("--max-shard-size", type=parse_size, default=hf.DEFAULT_MAX_SHARD_BYTES,
                        help="hf: largest safetensors file before sharding with an index (default 5GiB)")
    parser.add_argument("--base", default="", help="--from peft: the model the adapters adapt (any format)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config, written = convert(args.source, args.source_format, args.target, args.target_format,
                              dtype=args.dtype, meta_shards=args.shards, max_shard_bytes=args.max_shard_size,
                              base=args.base)
    print(f"converted {args.source_format} {args.source} -> {args.target_format} {args.target}: "
          f"{config.n_layers} layers, dim {config.dim}, {written / 1e9:.2f} GB of weights "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
