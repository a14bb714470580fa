"""`python -m llama2_jax <command> [flags]`: one entry point for every stage.

Each command lives in its own module and exposes `main(argv)`; importing lazily keeps
`python -m llama2_jax --help` instant and lets a command's heavy imports stay its own.
"""

import importlib
import sys

COMMANDS = {
    "train": ("llama2_jax.train.pretrain", "pretrain a model (the one training loop)"),
    "generate": ("llama2_jax.generate_cli", "sample completions for a file of prompts"),
    "chat": ("llama2_jax.chat_cli", "interactive chat with a checkpoint"),
    "convert": ("llama2_jax.checkpoint.convert", "convert checkpoints between meta, hf and orbax"),
    "tokenizer": ("llama2_jax.data.tokenizer", "train or inspect a SentencePiece tokenizer"),
    "data": ("llama2_jax.data.prepare", "build and inspect datasets"),
    "bench": ("llama2_jax.bench", "training and sampling throughput benchmarks"),
    "aot": ("llama2_jax.aot", "compile the training step for a TPU topology; print memory per chip"),
}

# Commands that run one process per host on a pod or cluster, and so join the job first.
MULTI_PROCESS_COMMANDS = ("train", "generate", "bench")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m llama2_jax <command> [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    if command in MULTI_PROCESS_COMMANDS:
        from llama2_jax.distributed import initialize_from_environment

        initialize_from_environment()
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
