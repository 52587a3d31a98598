"""lite: chat with DeepSeek-V2/V3-class MoE models on one consumer GPU."""

from __future__ import annotations

from typing import Any

__all__ = ["load", "Tokenizer", "LiteError"]

from lite.errors import LiteError


def load(path: str, device: str = "auto", **options: Any):
    """Load a GGUF model. See `lite.loader.load` for the options."""
    from lite.loader import load as _load

    return _load(path, device=device, **options)


def __getattr__(name: str):
    if name == "Tokenizer":
        from lite.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)
