"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user (model, data, option value, output folder)."""
