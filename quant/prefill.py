"""Many rows times a GGUF weight on the CPU, at matrix speed: expand the weight to bf16, then one GEMM.

Decode (one row) is bound by memory: the 8-bit block kernels (quant/native.py) read the weight once in its compact
form and win. Prefill multiplies each weight by tens to hundreds of rows and is bound by arithmetic, where the
block kernels reach ~150-300 GFLOP/s on two cores and oneDNN's bf16 GEMM (AVX512-BF16, or AMX tiles where the CPU
has them) ~600-900. The native expander (`native.dequantize`: ~0.1 ns per weight per thread) makes the detour
cheap: for an expert multiplied by 48 tokens, expanding costs about a fifth of the GEMM. `FROM_ROWS` gives the
row count from which this path is taken, per type (measured by `benchmarks/bench_prefill.py --kernels`).

The activations are rounded to bf16 for the GEMM (float32 accumulation), as AMX/oneDNN prefill does in other
engines; decode keeps the exact 8-bit-activation kernels, and an f32 GGUF never comes here (dense float weights).
"""

from __future__ import annotations

import functools
import threading

import gguf
import torch
import torch.nn.functional as F

from quant import native

Q = gguf.GGMLQuantizationType

# Rows from which expand + bf16 GEMM beats the 8-bit block kernel for one 2048x2048 weight (CPU time, 1 thread,
# AMD EPYC with AVX512-BF16; 2026-12-05): the 32-value types and Q6_K cross at ~10 rows, Q4_K (the cheapest 8-bit
# kernel) at ~20; the types without a hand-written expander (0.4-1 ns per weight through the type table) later.
FROM_ROWS = {Q.Q8_0: 12, Q.Q4_0: 12, Q.Q5_0: 12, Q.Q4_K: 20, Q.Q6_K: 12,
             Q.Q5_1: 12, Q.IQ4_NL: 12, Q.IQ4_XS: 16, Q.Q5_K: 24, Q.Q2_K: 24, Q.Q3_K: 32}  # fmt: skip
# ... and for a whole expert (gate/up Q4_K, down Q8_0 or Q5_0: `bench_prefill.py --kernels`), where fusing gate
# and up into one GEMM moves the crossover to ~14 rows.
SWIGLU_FROM_ROWS = 16

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


def gguf_linear(x: torch.Tensor, raw: torch.Tensor, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, W (N, K) given as GGUF bytes: expanded once, one GEMM."""
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
    """down(silu(gate x) * up x) for x [M, hidden], each weight as (raw, qtype, shape): gate and up expanded into
    one buffer and multiplied in one GEMM (half the GEMM calls, one pass over x); the SwiGLU in float32."""
    dtype = gemm_dtype()
    inter, hidden = gate[2]
    buf = _buffer(2 * inter * hidden, dtype).view(2 * inter, hidden)
    expand(*gate[:2], gate[2], dtype, buf[:inter])
    expand(*up[:2], up[2], dtype, buf[inter:])
    gu = linear(x.to(dtype), buf).float()  # [M, 2 * inter]
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    w = _buffer(down[2][0] * down[2][1], dtype).view(down[2])  # the gate/up expansion is no longer needed
    expand(*down[:2], down[2], dtype, w)
    return linear(h.to(dtype), w).to(x.dtype)
