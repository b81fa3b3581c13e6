"""The exceptions the command line turns into one line on stderr and an exit code.

``UsageError``: bad input from the user (exit 2, nothing written). ``RunFailed``: a fault during a run
(non-finite loss, gradient or importance; disk full): the run folder is marked ``failed`` with the reason,
the last good weights stay on disk, exit 1.
"""


class UsageError(Exception):
    """Bad input from the user (model, data, option value, output folder)."""


class RunFailed(Exception):
    """A run could not go on; the message says why (one line)."""


class NonFiniteError(RunFailed):
    """A loss, gradient or importance score is NaN or infinite."""


def warn(message: str) -> None:
    """One warning line on stderr (library logging is muted by the command line)."""
    import sys
    print(f"greentrainer: warning: {message}", file=sys.stderr)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (its type name if it has none)."""
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__
