"""The one user-facing error type, defined at the bottom layer so every package can raise it.

Each message is one line naming the problem and the fix; the CLI prints it without a traceback.
`lite.errors.LiteError` is this same class.
"""


class LiteError(Exception):
    """An error caused by user input or environment (bad file, impossible budget, missing dependency)."""
