"""Many rows times a GGUF weight on the CPU, at matrix speed.

Decode (one row) is bound by memory: the 8-bit block kernels (quant/native.py) read the weight once in its compact
form and win. Prefill multiplies each weight by tens to hundreds of rows and is bound by arithmetic; two GEMMs serve
it, chosen per CPU by `gemm_kind` (measured once; $LITE_PREFILL_GEMM=int8|bf16 overrides):

- "int8" (AVX512-VNNI without AMX: Zen 4/5, Ice Lake): quant/csrc/int8_gemm.cpp decodes the weight a panel at a
  time, requantizes it to 8 bits per 128 values, and multiplies 8-bit activations with vpdpbusd, twice the
  multiply-adds per instruction of bf16 (~1.7 vs ~0.85 TOP/s on two Zen 5 cores). Like llama.cpp's K-quant path it
  quantizes the activations to 8 bits in blocks; with the weight's requantization its error is ~1.3x that of the
  8-bit decode kernels (llama.cpp's numerics). Q8_0 weights, whose own error is smaller, keep the bf16 GEMM.
- "bf16" (AMX, AVX512-BF16, else float32): the weight expanded to bf16 by the native expander (~0.1 ns per weight per
  thread), then oneDNN's GEMM (AMX tiles where the CPU has them). The activations are rounded to bf16 (float32
  accumulation), as AMX/oneDNN prefill does in other engines.

`from_rows` gives the row count from which these paths beat the 8-bit kernels, per type (measured by
`benchmarks/bench_prefill.py --kernels`). Decode keeps the 8-bit kernels; an f32 GGUF never comes here.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import gguf
import torch
import torch.nn.functional as F

from quant import native
from quant.errors import LiteError

Q = gguf.GGMLQuantizationType

# Rows from which expand + bf16 GEMM beats the 8-bit block kernel for one 2048x2048 weight (CPU time, 1 thread,
# AMD EPYC with AVX512-BF16; 2026-12-05): the 32-value types and Q6_K cross at ~10 rows, Q4_K (the cheapest 8-bit
# kernel) at ~20; the types without a hand-written expander (0.4-1 ns per weight through the type table) later.
FROM_ROWS = {Q.Q8_0: 12, Q.Q4_0: 12, Q.Q5_0: 12, Q.Q4_K: 20, Q.Q6_K: 12,
             Q.Q5_1: 12, Q.IQ4_NL: 12, Q.IQ4_XS: 16, Q.Q5_K: 24, Q.Q2_K: 24, Q.Q3_K: 32}  # fmt: skip
# ... and with the int8 GEMM (same machine and measure, `--kernels`): Q6_K crosses at ~6 rows, the 32-value types
# at ~9, Q4_K at ~13.
INT8_FROM_ROWS = {**FROM_ROWS, Q.Q4_0: 10, Q.Q5_0: 10, Q.Q4_K: 14, Q.Q6_K: 8}
# ... and for a whole expert (gate/up Q4_K, down Q8_0 or Q5_0: `bench_prefill.py --kernels`), where fusing gate
# and up into one GEMM moves the crossover to ~14 rows (bf16) / ~12 (int8).
SWIGLU_FROM_ROWS = 16
INT8_SWIGLU_FROM_ROWS = 12
SWIGLU_MIN_ROWS = min(SWIGLU_FROM_ROWS, INT8_SWIGLU_FROM_ROWS)  # below it, no need to ask `swiglu_from_rows`
GEMM_KINDS = ("int8", "bf16")
# Q8_0's own rounding is finer than 8-bit activations per 128 values: it keeps the bf16 GEMM.
_INT8_SKIP = {Q.Q8_0}


# int8 is chosen only when it measures at least this much faster: bf16 has a third of its rounding error
INT8_MIN_SPEEDUP = 1.2


@functools.cache
def _vnni() -> bool:
    return native.available() and native.best_isa() == "avx512"


@functools.cache
def _auto_kind() -> str:
    """Measured once per process: both GEMMs on one V2-Lite expert's gate (Q4_K 1408x2048) times 48 rows, at the
    current thread count (~40 ms). AMX CPUs run oneDNN's bf16 on tiles and keep bf16; AVX512-VNNI without AMX
    (Zen 4/5, Ice Lake) measured int8 1.6x faster (benchmarks/README.md, "Prompt processing")."""
    if not _vnni():
        return "bf16"
    g = torch.Generator().manual_seed(0)
    shape = (1408, 2048)
    raw = native.quantize(torch.randn(shape, generator=g) * 0.02, int(Q.Q4_K)).reshape(-1)
    x = torch.randn(48, shape[1], generator=g)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_int8 = best(lambda: int8_linear(quantize_acts(x), raw, Q.Q4_K, shape))
    t_bf16 = best(lambda: _bf16_linear(x, raw, Q.Q4_K, shape))
    return "int8" if t_bf16 >= INT8_MIN_SPEEDUP * t_int8 else "bf16"


def gemm_kind() -> str:
    """ "int8" or "bf16": $LITE_PREFILL_GEMM, else int8 where this CPU runs it `INT8_MIN_SPEEDUP` faster (measured
    once: AVX512-VNNI without AMX), else bf16."""
    kind = os.environ.get("LITE_PREFILL_GEMM") or _auto_kind()
    if kind not in GEMM_KINDS:
        raise LiteError(f"unknown prefill GEMM {kind!r}: use one of {', '.join(GEMM_KINDS)} (LITE_PREFILL_GEMM)")
    if kind == "int8" and not _vnni():
        raise LiteError("LITE_PREFILL_GEMM=int8 needs a CPU with AVX512-VNNI; unset it to use bf16")
    return kind


def _int8(qtype: Q, shape: tuple[int, int]) -> bool:
    """The int8 GEMM takes this weight: chosen, not Q8_0, N a multiple of 16 and K of 64 (its tiles)."""
    return qtype not in _INT8_SKIP and shape[0] % 16 == 0 and shape[1] % 64 == 0 and gemm_kind() == "int8"


def from_rows(qtype: Q, shape: tuple[int, int]) -> int:
    """Rows of x from which `gguf_linear` beats the 8-bit block kernels for this weight."""
    return (INT8_FROM_ROWS if _int8(qtype, shape) else FROM_ROWS).get(qtype, 1 << 62)


def swiglu_from_rows(gate_qtype: Q, gate_shape: tuple[int, int]) -> int:
    """Rows from which an expert takes `swiglu` rather than three 8-bit kernel calls."""
    return INT8_SWIGLU_FROM_ROWS if _int8(gate_qtype, gate_shape) else SWIGLU_FROM_ROWS


# oneDNN, which runs torch's bf16 GEMMs on the CPU, builds and caches (up to 1024) a primitive for every shape
# it meets, ~0.6 MiB each: a chat's prefill chunks of 96..128 rows grew the process by 100 MiB over a few hundred
# turns. `linear` pads the rows of a bf16 GEMM up to 8 sizes per octave (at most 12.5% more rows), so few shapes
# ever occur; fewer than 16 rows run as they are.
_EXACT_ROWS = 16


def bucket_rows(m: int) -> int:
    """`m` rounded up to one of 8 sizes per octave (16, 18, ..., 30, 32, 36, ...); below 16, `m` itself."""
    if m < _EXACT_ROWS:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x [M, in], w); a bf16 GEMM on the CPU with M padded by `bucket_rows` (see _EXACT_ROWS)."""
    m = x.shape[0]
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or x.dim() != 2 or bucket_rows(m) == m:
        return F.linear(x, w)
    return F.linear(F.pad(x, (0, 0, 0, bucket_rows(m) - m)), w)[:m]


@functools.cache
def gemm_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies it natively (AVX512-BF16 / AMX via oneDNN), else float32."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


_scratch = threading.local()  # one reusable expansion buffer per thread: no page faults per weight
# The largest expansion kept for reuse (an expert's fused gate+up is 11 MiB in bf16 for V2-Lite, 30 MiB for V2); a
# larger one (a dense layer's MLP, the output head when every position's logits are wanted) is allocated per call
# and freed, so no process keeps hundreds of MiB of scratch after one long prefill.
SCRATCH_MAX_BYTES = 64 << 20


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    if numel * dtype.itemsize > SCRATCH_MAX_BYTES:
        return torch.empty(numel, dtype=dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def expand(raw: torch.Tensor, qtype: Q, shape: tuple[int, int], dtype: torch.dtype, out: torch.Tensor) -> None:
    """Write the (N, K) weight held in `raw` into `out` ((N, K), `dtype`). Callers run this path only for weights the
    native kernels take (`QMatrix._native`, `ExpertWeights.native`), every one of which the native expander takes."""
    native.dequantize(raw, int(qtype), *shape, out=out)


def quantize_acts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> its 8-bit codes (in the int8 GEMM's tile layout) and scales, for `int8_linear` calls that share x."""
    return torch.ops.lite_gguf.quantize_acts_u8(x.float().contiguous())


def int8_linear(
    qx: tuple[torch.Tensor, torch.Tensor], raw: torch.Tensor, qtype: Q, shape: tuple[int, int]
) -> torch.Tensor:
    """float32 [M, N] = x @ W.T, x as `quantize_acts` gave it, W (N, K) as GGUF bytes (int8_gemm.cpp)."""
    return torch.ops.lite_gguf.int8_linear(*qx, raw, int(qtype), shape[0])


def gguf_linear(x: torch.Tensor, raw: torch.Tensor, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, W (N, K) given as GGUF bytes: the int8 GEMM, or W expanded to bf16
    once and one bf16 GEMM."""
    if _int8(qtype, shape):
        return int8_linear(quantize_acts(x), raw, qtype, shape).to(x.dtype)
    return _bf16_linear(x, raw, qtype, shape)


def _bf16_linear(x: torch.Tensor, raw: torch.Tensor, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    dtype = gemm_dtype()
    w = _buffer(shape[0] * shape[1], dtype).view(shape)
    expand(raw, qtype, shape, dtype, w)
    return linear(x.to(dtype), w).to(x.dtype)


def swiglu(
    x: torch.Tensor,
    gate: tuple[torch.Tensor, Q, tuple[int, int]],
    up: tuple[torch.Tensor, Q, tuple[int, int]],
    down: tuple[torch.Tensor, Q, tuple[int, int]],
) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [M, hidden], each weight as (raw, qtype, shape); the SwiGLU in float32.
    int8: x quantized once for gate and up. bf16: gate and up expanded into one buffer and multiplied in one GEMM
    (half the GEMM calls, one pass over x)."""
    inter, hidden = gate[2]
    if _int8(*gate[1:]) and _int8(*up[1:]):
        qx = quantize_acts(x)
        h = F.silu(int8_linear(qx, *gate)) * int8_linear(qx, *up)
    else:
        dtype = gemm_dtype()
        buf = _buffer(2 * inter * hidden, dtype).view(2 * inter, hidden)
        expand(*gate[:2], gate[2], dtype, buf[:inter])
        expand(*up[:2], up[2], dtype, buf[inter:])
        gu = linear(x.to(dtype), buf).float()  # [M, 2 * inter]
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
    return gguf_linear(h, *down).to(x.dtype)
