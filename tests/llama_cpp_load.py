"""Loading a GGUF into llama-cpp-python, the optional comparison engine of the cross-check tests and of
benchmarks/bench_decode.py (which imports it from here)."""

from __future__ import annotations

from typing import Any


def load_llama(path: str, extra_bufts: bool = False, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path=path, **kwargs)` with llama.cpp's extra (AMX / repacking) buffer types on or
    off. In this sandbox the natively built AMX path dies (SIGILL or a scheduler assert) with them on, whatever
    the file (benchmarks/README.md, Converter), hence off by default."""
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as C

    default = C.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    C.llama_model_default_params = params  # Llama() takes its model parameters from here
    try:
        return Llama(model_path=path, **kwargs)
    finally:
        C.llama_model_default_params = default
