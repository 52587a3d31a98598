"""lite: chat with DeepSeek-V2/V3-class MoE models on one consumer GPU."""

from __future__ import annotations

import os
from typing import Any

# oneDNN (torch's CPU GEMMs in bf16) and ideep keep a compiled primitive and reordered buffers for every shape they
# meet, up to 1024 each by default: a long chat's prompts of every length grew the demo model's chat from ~400 MiB
# to ~970 MiB. 128 holds every shape one long prefill uses (fewer re-JIT the attention blocks every layer: 32 cost
# 10 % of a 512-token prefill). Read when torch first runs such a GEMM; set either variable to override.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

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
