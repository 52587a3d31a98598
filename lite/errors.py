"""User-facing errors: each message is one line naming the problem and the fix."""

from quant.errors import LiteError

__all__ = ["ContextTooSmall", "LiteError"]


class ContextTooSmall(LiteError):
    """A prompt or a reply does not fit the context. The message names no CLI flag: the CLI adds its own."""
