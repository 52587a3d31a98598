"""Native CPU kernels that multiply directly on GGUF blocks (the types in SUPPORTED_QTYPES).

Like llama.cpp, the activations are quantized per row to 8 bits (Q8_0 blocks of 32, or Q8_K blocks of 256
for K-quants and IQ4_XS) and each block's dot product runs in integers (AVX512-VNNI `vpdpbusd`, or AVX2 `pmaddubsw`),
so the weights are read once, in their compact form, with no float copy. The C++ extension is compiled on
first use into torch's extension cache (TORCH_EXTENSIONS_DIR) with ninja; the AVX2 and AVX512 variants are
chosen at run time from the CPU's features. If compilation fails, `available()` is False and callers fall
back to torch.

The same extension holds the block quantizers (`quantize`, the types in QUANTIZE_QTYPES, with llama.cpp's
reference algorithms, byte for byte; see quant/csrc/quant_blocks.h) used by the converter.

Which types have kernels / quantizers is the extension's type table (quant/csrc/type_traits.cpp), read through
`type_table()`: SUPPORTED_QTYPES and QUANTIZE_QTYPES are computed from it on first access (building the
extension); both are empty when it cannot build.

Set LITE_NATIVE_ISA=scalar|avx2|avx512 to cap the instruction set (for tests and comparisons; `scalar` also
runs the K-quant searches in their baseline build).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

from quant.errors import LiteError

# Also SUPPORTED_QTYPES, QUANTIZE_QTYPES and DEQUANT_QTYPES: from the type table on first access (__getattr__).
__all__ = [
    "ISAS",
    "all_finite",
    "as_raw",
    "available",
    "best_isa",
    "build_error",
    "dequantize",
    "gguf_matmul",
    "moe_ffn",
    "quantize",
    "quantize_acts",
    "type_table",
]

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}

_SOURCES = [
    "ops.cpp",
    "type_traits.cpp",
    "kernels_scalar.cpp",
    "kernels_avx2.cpp",
    "kernels_avx512.cpp",
    "quantize_ops.cpp",
    "quantize_legacy.cpp",
    "quantize_kquants.cpp",
    "dequant_ops.cpp",
    "int8_gemm.cpp",
]
_CSRC = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _load() -> bool:
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            from torch.utils import cpp_extension

            # Cached in TORCH_EXTENSIONS_DIR; ninja rebuilds only what changed (headers tracked through -MMD).
            cpp_extension.load(
                name="lite_gguf_kernels",
                sources=[str(_CSRC / s) for s in _SOURCES],
                # -fopenmp makes at::parallel_for (an inline OpenMP template) actually run in parallel
                extra_cflags=["-O3", "-fopenmp", "-Wno-psabi"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            _state["ok"] = hasattr(torch.ops.lite_gguf, "matmul")
        except Exception as e:  # no compiler, no ninja, unsupported platform: fall back to torch
            _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
        return bool(_state["ok"])


def available() -> bool:
    """True when the extension is built (compiling it on the first call) and loaded."""
    return _load()


def build_error() -> str | None:
    """Why the extension is unavailable, if it is."""
    _load()
    return _state.get("error")  # type: ignore[return-value]


class TypeInfo(NamedTuple):
    """One row of the extension's type table."""

    qtype: int  # gguf.GGMLQuantizationType id
    block: int  # values per block
    bytes: int  # bytes per block
    q8_k: bool  # activations quantized to Q8_K (blocks of 256), else Q8_0 (blocks of 32)
    matmul: bool  # has block-dot kernels (gguf_matmul, moe_ffn)
    quantize: bool  # has a reference quantizer (quantize)


def type_table() -> dict[str, TypeInfo]:
    """The extension's type table by gguf type name; empty when the extension is unavailable."""
    if "table" not in _state:
        flat = list(torch.ops.lite_gguf.type_table()) if available() else []
        rows = (flat[i : i + 6] for i in range(0, len(flat), 6))
        _state["table"] = {gguf.GGMLQuantizationType(r[0]).name: TypeInfo(*r[:3], *map(bool, r[3:])) for r in rows}
    return _state["table"]  # type: ignore[return-value]


def __getattr__(name: str) -> dict[str, int]:
    # SUPPORTED_QTYPES: {name: gguf id} of the types the kernels read; QUANTIZE_QTYPES: those the quantizers write.
    # Module attributes computed on first access, so importing this module never builds the extension.
    if name == "SUPPORTED_QTYPES":
        return {k: t.qtype for k, t in type_table().items() if t.matmul}
    if name == "QUANTIZE_QTYPES":
        return {k: t.qtype for k, t in type_table().items() if t.quantize}
    if name == "DEQUANT_QTYPES":  # every type in the table has a row dequantizer (`dequantize`)
        return {k: t.qtype for k, t in type_table().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def best_isa() -> str:
    """The instruction set the kernels use on this CPU: 'avx512' (VNNI), 'avx2' or 'scalar'."""
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    level = int(torch.ops.lite_gguf.best_isa())
    return next(k for k, v in ISAS.items() if v == level)


def _isa_level(isa: str | None) -> int:
    isa = isa or os.environ.get("LITE_NATIVE_ISA")
    if not isa:
        return -1
    if isa not in ISAS:
        raise LiteError(f"unknown ISA {isa!r}: use one of {', '.join(ISAS)} (LITE_NATIVE_ISA)")
    return ISAS[isa]


def as_raw(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 tensor sharing memory with `data` (e.g. a read-only view of a memory-mapped GGUF file)."""
    if isinstance(data, torch.Tensor):
        return data.contiguous().view(torch.uint8).reshape(-1)
    arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # the kernels never write to it; don't warn about read-only mmaps
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def gguf_matmul(
    x: torch.Tensor, raw: torch.Tensor | np.ndarray, qtype: int, N: int, K: int, isa: str | None = None
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W.T for W (N, K) given as its raw GGUF bytes of type `qtype` (zero-copy).

    x is quantized per row to Q8_0 (Q8_K for the 256-value types) exactly as llama.cpp's reference quantizers do;
    block dots run in integers, scales in float32. `isa` caps the instruction set ('scalar', 'avx2',
    'avx512'); the default is the best this CPU has.
    """
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raw = as_raw(raw)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.dtype != torch.float32:
        x2 = x2.float()
    y = torch.ops.lite_gguf.matmul(x2, raw, int(qtype), int(N), int(K), _isa_level(isa))
    return y if x.dim() == 2 else y.reshape(*lead, int(N))


def quantize(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """float32 [..., K] -> GGML blocks uint8 [..., K / block * block bytes], for the types in QUANTIZE_QTYPES.

    llama.cpp's reference quantizers (`quantize_row_*_ref`, no importance matrix): the same bytes as llama.cpp
    and as gguf-py's numpy quantizers, computed over torch's intra-op threads.
    """
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    x = x.float()
    out = torch.ops.lite_gguf.quantize(x, int(qtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dequantize(
    raw: torch.Tensor | np.ndarray,
    qtype: int,
    N: int | None = None,
    K: int | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GGUF blocks of any type in the type table -> float32 or bf16 values, over torch's threads.

    With N and K, `raw` holds an (N, K) weight and the result is (N, K) (written into `out` when given: a
    contiguous (N, K) tensor of `dtype`, e.g. half of a fused gate+up buffer); without, the result is flat
    [n_blocks * block]. Values are bit-identical to gguf.quants.dequantize (then rounded to nearest even for bf16).
    Q4_0, Q5_0, Q8_0, Q4_K and Q6_K have hand-written AVX-512 forms (~0.1 ns per weight, for prefill GEMMs).
    """
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raw = as_raw(raw)
    raw = raw.reshape(-1)
    flat = N is None or K is None
    if flat:
        info = next((t for t in type_table().values() if t.qtype == int(qtype)), None)
        if info is None:
            raise LiteError(f"cannot dequantize GGUF type id {qtype} natively")
        N, K = 1, raw.numel() // info.bytes * info.block
    if out is None:
        out = torch.empty(int(N), int(K), dtype=dtype)  # type: ignore[arg-type]
    torch.ops.lite_gguf.dequantize_into(raw, int(qtype), out, _isa_level(None))
    return out.reshape(-1) if flat else out


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of a float32 CPU tensor is finite (no NaN, no Inf), in one multi-threaded pass."""
    if not available():
        return bool(torch.isfinite(x).all())
    return bool(torch.ops.lite_gguf.all_finite(x))


def quantize_acts(x: torch.Tensor, q8_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantizer the kernels use: (qs int8 [M, K], d float32 [M, K/bs], sums int32).

    sums are per 32-block sums of qs for Q8_0 and per-16 `bsums` for Q8_K. Exposed for tests.
    """
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    return torch.ops.lite_gguf.quantize_acts(x.float(), bool(q8_k))


def moe_ffn(
    x: torch.Tensor,
    gate: list[torch.Tensor],
    up: list[torch.Tensor],
    down: list[torch.Tensor],
    weights: torch.Tensor,
    qtypes: tuple[int, int, int],
    inter: int,
    isa: str | None = None,
) -> torch.Tensor:
    """One token through k routed experts in one call: sum_e weights[e] * down_e(silu(gate_e x) * up_e x).

    x: [hidden] float32; gate[e], up[e]: raw GGUF bytes of (inter, hidden) matrices; down[e]: (hidden, inter);
    qtypes: the (gate, up, down) GGUF type ids. The same math as chaining `gguf_matmul`, minus ~3k Python calls.
    """
    if not available():
        raise LiteError("native kernels unavailable: " + str(build_error()))
    g, u, d = qtypes
    return torch.ops.lite_gguf.moe_ffn(
        x.float(), gate, up, down, weights.float(), int(g), int(u), int(d), int(inter), _isa_level(isa)
    )
