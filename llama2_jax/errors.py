"""Errors raised at every layer that the command line turns into an exit status.

A leaf module: the config sections (train/config.py) raise `ConfigError` and the config command
line (config_cli.py) both raises it and reads the sections' documentation, so the error lives below
both of them rather than in either.
"""


class ConfigError(ValueError):
    """A config file, override or key that cannot be used, with what to do instead (exit status 2)."""


def one_line(error: BaseException) -> str:
    """An error's message on one line, as a command prints it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
