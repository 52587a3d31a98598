"""User-facing errors: each message is one line naming the problem and the fix."""


class LiteError(Exception):
    """An error caused by user input or environment; the CLI prints it as one line, without a traceback."""
