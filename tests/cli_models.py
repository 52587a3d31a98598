"""Tiny converted GGUF models with a real tokenizer, built once per test session, for the CLI/chat tests."""

from __future__ import annotations

from pathlib import Path

_BUILT: dict[str, tuple[Path, Path]] = {}


def tiny_chat_model(root: Path, outtype: str | None = "f32", kind: str = "lite", seed: int = 5) -> tuple[Path, Path]:
    """(gguf path, HF checkpoint dir): a tiny random DeepSeek-V2 + tiny BPE tokenizer, converted by lite."""
    key = f"{kind}-{outtype}-{seed}"
    if key not in _BUILT:
        from tiny_models import make_checkpoint
        from tiny_tokenizer import write_tiny_tokenizer

        from lite.convert import convert

        hf = make_checkpoint(root / f"hf-{key}", kind, seed=seed)
        write_tiny_tokenizer(hf)
        out = root / f"tiny-{key}.gguf"
        convert(hf, out, outtype=outtype)
        _BUILT[key] = (out, hf)
    return _BUILT[key]
