"""User-facing errors: each message is one line naming the problem and the fix."""

from quant.errors import LiteError

__all__ = ["LiteError"]
