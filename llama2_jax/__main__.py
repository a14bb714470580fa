"""`python -m llama2_jax <command> [flags]`: see llama2_jax/cli.py."""

import sys

from llama2_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
