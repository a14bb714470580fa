"""Input pipeline throughput: tokens/s of packed batches, tokenizing on the fly and pre-tokenized
(rows packed once, read by index).

    python benchmarks/data_pipeline.py [--seq-len 4096] [--batch-size 8] [--batches 200]

Runs on the bundled Shakespeare corpus with the bundled tokenizer, on the host CPU only (numpy
batches, no device transfer). "tokens/s" counts every position of every batch; "real tokens/s"
counts only positions with loss weight (not padding). One H100 trains the 1.1B shape at ~50k tokens/s.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama2_jax.data import tokenized  # noqa: E402
from llama2_jax.data.config import default_data_config  # noqa: E402
from llama2_jax.data.pipeline import local_batches, open_split  # noqa: E402
from llama2_jax.data.row_batches import make_row_batches  # noqa: E402
from llama2_jax.data.text import DocumentChunks, next_token_spec  # noqa: E402
from llama2_jax.data.tokenizer import Tokenizer  # noqa: E402


def host_batches(data_config, tokenizer, *, seq_len: int, batch_size: int):
    """Pretraining's batches as the `train` command makes them, as numpy arrays on this host."""
    spec = next_token_spec(seq_len)
    if tokenized.is_configured(data_config):
        rows = tokenized.open_rows(data_config, "train", tokenizer, seq_len)
        return make_row_batches(data_config, rows, spec, global_batch_size=batch_size, mesh=None, seed=0)
    source = open_split(data_config, "train", kind="text")
    dataset, _ = local_batches(data_config, source, spec, DocumentChunks(tokenizer, seq_len),
                               local_batch_size=batch_size, seed=0)
    return iter(dataset)


def measure(data_config, tokenizer, *, seq_len: int, batch_size: int, batches: int) -> tuple[float, float]:
    iterator = host_batches(data_config, tokenizer, seq_len=seq_len, batch_size=batch_size)
    next(iterator)  # warm up: opening files, starting threads
    positions = real = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        positions += batch["inputs"].size
        real += int((batch["loss_weights"] > 0).sum())
    elapsed = time.perf_counter() - start
    iterator.close()
    return positions / elapsed, real / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer = Tokenizer()
    with tempfile.TemporaryDirectory() as data_dir:
        config = default_data_config()
        config.data_dir = data_dir
        config.worker_threads = args.threads
        for label, pretokenize in (("tokenize on the fly", False), ("pre-tokenized array_record", True)):
            config.pretokenize = pretokenize
            measure(config, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size, batches=1)  # build
            tokens, real = measure(config, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                                   batches=args.batches)
            print(f"{label:28s} seq {args.seq_len} batch {args.batch_size}: {tokens:12,.0f} tokens/s "
                  f"({real:,.0f} real tokens/s)")


if __name__ == "__main__":
    main()
