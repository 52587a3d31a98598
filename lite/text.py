"""User text that may not be valid UTF-8 (a pipe, a terminal, argv): decoded with replacement, never raising."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str) -> tuple[str, int]:
    """`text` with lone surrogates (undecodable bytes smuggled in by Python's surrogateescape, as argv and a
    reconfigured stdin carry them) replaced by U+FFFD, and how many were replaced."""
    return _SURROGATE.subn("\ufffd", text)


def decode_input(data: bytes) -> tuple[str, int]:
    """UTF-8 text of `data`, each invalid byte replaced by U+FFFD, and the number of bytes replaced."""
    return scrub(data.decode("utf-8", errors="surrogateescape"))


def replaced_note(n: int, what: str = "the input") -> str:
    """The one-line report of a replacement, e.g. for stderr or a chat note."""
    return f"{what} was not valid UTF-8: {n} invalid byte{'s' if n != 1 else ''} replaced with U+FFFD (\ufffd)"
