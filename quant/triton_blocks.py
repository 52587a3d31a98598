"""Triton kernels that multiply by raw GGUF blocks: per-type dequantization helpers and the matmul kernel.

Imported lazily by `quant.device_kernels` (this module needs triton). Whether the kernels are compiled for the GPU
or run by triton's CPU interpreter is decided when this module is imported (`TRITON_INTERPRET=1` at that moment).

Every kernel dequantizes a [BLOCK_N, BLOCK_K] tile of weights inside its K loop, straight from the GGUF bytes, and
multiplies in float32. Quantized tiles are built as [BLOCK_N, NG, G]: NG groups of G columns that share one scale
(G = 32, or 16 for Q6_K), so each scale is decoded once per group, not once per weight, and the tile is reshaped
to [BLOCK_N, BLOCK_K] at the end. Column index arithmetic ([NG, G]) is shared by all rows of the tile. The bit
layouts follow `quant/formats.py` (bit-identical to gguf.quants) and its float operations in the same order.

Rows are passed as a [BLOCK_N] vector of uint8 pointers to the first byte of each row, so the same helpers serve a
plain matrix and an expert inside a pool slot. Matrices start 16-byte aligned and every GGUF block size is even,
so every f16 field sits at an even address and is read through a uint16 pointer and bit-cast.
"""

from __future__ import annotations

import gguf
import torch
import triton
import triton.language as tl

Q = gguf.GGMLQuantizationType

# gguf.GGMLQuantizationType values: the kernels branch on these at compile time (QTYPE is a constexpr).
_F32 = tl.constexpr(0)
_F16 = tl.constexpr(1)
_Q4_0 = tl.constexpr(2)
_Q4_1 = tl.constexpr(3)
_Q5_0 = tl.constexpr(6)
_Q5_1 = tl.constexpr(7)
_Q8_0 = tl.constexpr(8)
_Q4_K = tl.constexpr(12)
_Q5_K = tl.constexpr(13)
_Q6_K = tl.constexpr(14)
_BF16 = tl.constexpr(30)

# tl.dot on float32 tiles: three TF32 passes (~float32 accuracy on tensor cores); plain "tf32" keeps ~10 bits.
DOT_PRECISION = tl.constexpr("tf32x3")


def block_elems(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: Q, k: int) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return k // bs * ts


# ---------------------------------------------------------------------------------------------------------------
# field readers


@triton.jit
def _u8(ptrs, mask):
    return tl.load(ptrs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(rows, off, mask):
    """The f16 field at byte offset off[g] (even) of each row, as float32 [BLOCK_N, NG]."""
    rows16 = rows.to(tl.pointer_type(tl.uint16))
    bits = tl.load(rows16[:, None] + (off >> 1)[None, :], mask=mask, other=0)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _groups(rmask, k0, K, QK: tl.constexpr, TS: tl.constexpr, G: tl.constexpr, NG: tl.constexpr):
    """Index vectors of the NG groups of G columns starting at column k0 (K is a whole number of blocks).

    Returns blk [NG] (byte offset of each group's block in a row), j [NG] (index of the group inside its block),
    i [NG, G] (position of each column inside its block) and gm [BLOCK_N, NG] (row in range and group below K;
    groups never straddle K).
    """
    g = k0 + tl.arange(0, NG) * G
    blk = (g // QK) * TS
    j = (g % QK) // G
    i = j[:, None] * G + tl.arange(0, G)[None, :]
    gm = rmask[:, None] & (g < K)[None, :]
    return blk, j, i, gm


@triton.jit
def _k_scale_min(rows, blk, j, gm):
    """llama.cpp's get_scale_min_k4: the 6-bit (scale, min) of sub-block j [NG] from the 12 bytes at blk + 4."""
    base = blk + 4 + (j & 3)
    a = _u8(rows[:, None] + base[None, :], gm)  # byte j (j < 4) or j - 4
    b = _u8(rows[:, None] + (base + 4)[None, :], gm)  # byte j + 4 (j < 4) or j
    c = _u8(rows[:, None] + (base + 8)[None, :], gm)  # byte j + 4 (j >= 4)
    hi = (j >= 4)[None, :]
    sc = tl.where(hi, (c & 15) | ((a >> 6) << 4), a & 63)
    mn = tl.where(hi, (c >> 4) | ((b >> 6) << 4), b & 63)
    return sc.to(tl.float32), mn.to(tl.float32)


# ---------------------------------------------------------------------------------------------------------------
# per-type tiles: [BLOCK_N, NG, G] float32


@triton.jit
def _tile_q8_0(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 34, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    q = tl.load(rows[:, None, None] + (blk[:, None] + 2 + i)[None], mask=gm[:, :, None], other=0)
    return q.to(tl.int8, bitcast=True).to(tl.float32) * d[:, :, None]


@triton.jit
def _nibble32(rows, blk, i, gm, QS: tl.constexpr):
    """4-bit value of element i of a 32-element block whose 16 nibble bytes start at byte QS: element i < 16 is the
    low nibble of byte i, element i >= 16 the high nibble of byte i - 16."""
    byte = _u8(rows[:, None, None] + (blk[:, None] + QS + (i & 15))[None], gm[:, :, None])
    return (byte >> ((i >> 4) * 4)[None]) & 15


@triton.jit
def _tile_q4_0(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 18, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    q = _nibble32(rows, blk, i, gm, 2)
    return d[:, :, None] * (q - 8).to(tl.float32)


@triton.jit
def _tile_q4_1(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 20, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    m = _f16(rows, blk + 2, gm)
    q = _nibble32(rows, blk, i, gm, 4)
    return d[:, :, None] * q.to(tl.float32) + m[:, :, None]


@triton.jit
def _tile_q5_0(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 22, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    # qh is a little-endian uint32 at byte 2 (not 4-aligned): bit i is byte 2 + i // 8, bit i % 8.
    qh = _u8(rows[:, None, None] + (blk[:, None] + 2 + (i >> 3))[None], gm[:, :, None])
    hi = (qh >> (i & 7)[None]) & 1
    q = _nibble32(rows, blk, i, gm, 6) | (hi << 4)
    return d[:, :, None] * (q - 16).to(tl.float32)


@triton.jit
def _tile_q5_1(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 24, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    m = _f16(rows, blk + 2, gm)
    qh = _u8(rows[:, None, None] + (blk[:, None] + 4 + (i >> 3))[None], gm[:, :, None])
    q = _nibble32(rows, blk, i, gm, 8) | (((qh >> (i & 7)[None]) & 1) << 4)
    return d[:, :, None] * q.to(tl.float32) + m[:, :, None]


@triton.jit
def _tile_q4_k(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 144, 32, BLOCK_K // 32)
    sc, mn = _k_scale_min(rows, blk, j, gm)
    dd = _f16(rows, blk, gm) * sc
    dm = _f16(rows, blk + 2, gm) * mn
    # 64-element chunk c = i // 64 uses qs[32c : 32c + 32]: low nibbles first, then high.
    byte = _u8(rows[:, None, None] + (blk[:, None] + 16 + 32 * (i >> 6) + (i & 31))[None], gm[:, :, None])
    q = (byte >> (((i >> 5) & 1) * 4)[None]) & 15
    return dd[:, :, None] * q.to(tl.float32) - dm[:, :, None]


@triton.jit
def _tile_q5_k(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 176, 32, BLOCK_K // 32)
    sc, mn = _k_scale_min(rows, blk, j, gm)
    dd = _f16(rows, blk, gm) * sc
    dm = _f16(rows, blk + 2, gm) * mn
    lo = _u8(rows[:, None, None] + (blk[:, None] + 48 + 32 * (i >> 6) + (i & 31))[None], gm[:, :, None])
    lo = (lo >> (((i >> 5) & 1) * 4)[None]) & 15
    # qh[l] (bytes 16..48) holds the 5th bit of item l of sub-block j in bit j.
    hi = _u8(rows[:, None, None] + (blk[:, None] + 16 + (i & 31))[None], gm[:, :, None])
    hi = (hi >> (i >> 5)[None]) & 1
    return dd[:, :, None] * (lo | (hi << 4)).to(tl.float32) - dm[:, :, None]


@triton.jit
def _tile_q6_k(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 210, 16, BLOCK_K // 16)
    sc = _u8(rows[:, None] + (blk + 192 + j)[None, :], gm).to(tl.int8).to(tl.float32)
    dd = _f16(rows, blk + 208, gm) * sc
    # Half h = i // 128 uses ql[64h : 64h + 64] (low nibbles for its first 64 items, high for the next 64) and
    # qh[32h : 32h + 32] (2-bit fields at shifts 0, 2, 4, 6 for its four runs of 32 items).
    h = i >> 7
    lo = _u8(rows[:, None, None] + (blk[:, None] + 64 * h + (i & 63))[None], gm[:, :, None])
    lo = (lo >> (((i >> 6) & 1) * 4)[None]) & 15
    hi = _u8(rows[:, None, None] + (blk[:, None] + 128 + 32 * h + (i & 31))[None], gm[:, :, None])
    hi = (hi >> (((i >> 5) & 3) * 2)[None]) & 3
    return dd[:, :, None] * ((lo | (hi << 4)) - 32).to(tl.float32)


@triton.jit
def dequant_tile(rows, rmask, k0, K, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights [BLOCK_N, BLOCK_K] float32 at columns k0.. of the rows at `rows` (uint8 pointers [BLOCK_N]);
    rows with rmask false and columns >= K read as 0. K is a multiple of QTYPE's block; BLOCK_K a power of two
    and a multiple of the scale group (32; 16 for Q6_K; any for the float types), e.g. the whole block."""
    if QTYPE == _F32:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.float32))[:, None] + kk[None, :]
        w = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
    elif QTYPE == _F16:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.uint16))[:, None] + kk[None, :]
        bits = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0)
        w = bits.to(tl.float16, bitcast=True).to(tl.float32)
    elif QTYPE == _BF16:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.uint16))[:, None] + kk[None, :]
        bits = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0)
        w = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # bf16 is the top half of a float32
    else:
        if QTYPE == _Q8_0:
            w3 = _tile_q8_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q4_0:
            w3 = _tile_q4_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q4_1:
            w3 = _tile_q4_1(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q5_0:
            w3 = _tile_q5_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q5_1:
            w3 = _tile_q5_1(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q4_K:
            w3 = _tile_q4_k(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == _Q5_K:
            w3 = _tile_q5_k(rows, rmask, k0, K, BLOCK_K)
        else:
            tl.static_assert(QTYPE == _Q6_K, "unsupported GGUF type")
            w3 = _tile_q6_k(rows, rmask, k0, K, BLOCK_K)
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def accumulate(acc, x, w, USE_DOT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K].T, all float32.

    USE_DOT: tensor cores (BLOCK_M >= 16). Otherwise the GEMV form for a few rows: broadcast, multiply, reduce."""
    if USE_DOT:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# matmul: out = x @ W.T


@triton.jit
def matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    w_row_bytes,
    QTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). x [M, K] any float dtype, W as raw GGUF rows, out [M, N]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rows = w_ptr + rn.to(tl.int64) * w_row_bytes
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows[:, None] + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
        w = dequant_tile(rows, nmask, k0, K, QTYPE, BLOCK_N, BLOCK_K)
        acc = accumulate(acc, x.to(tl.float32), w, USE_DOT)
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


INTERPRETED = not isinstance(matmul_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 when imported


def gemv_config(qtype: Q, m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M <= 8: all rows in one program, a 3-D product tile of ~4096
    floats, and BLOCK_N shrunk (down to 4) until there are enough programs to fill a GPU. Untuned guesses."""
    bm = _pow2_at_least(m)
    bk = max(block_elems(qtype), 128)
    bn = max(1, 4096 // (bm * bk))
    while bn > 4 and triton.cdiv(n, bn) < 264:
        bn //= 2
    return bm, bn, bk, 4


def gemm_config(qtype: Q, m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the tl.dot path (M > 8). BLOCK_K is 32 for every type, K-quants
    included (their scales are per 32 columns, 16 for Q6_K, so a 32-column step still decodes each scale once):
    ptxas -v for sm_90a shows a 64x64 tile spilling registers at BLOCK_K 64 and above (tf32x3 splits both operands),
    and none at 32. Otherwise untuned."""
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 32, 4


def interpreter_config(qtype: Q, m: int) -> tuple[int, int, int, int]:
    """Tiles for triton's CPU interpreter, whose cost is per operation, not per element: few, large programs."""
    return (_pow2_at_least(m) if m <= 8 else 64), 64, max(256, block_elems(qtype)), 4


def matmul(
    x: torch.Tensor, raw: torch.Tensor, qtype: Q, n: int, k: int, interpreter_tiles: bool | None = None
) -> torch.Tensor:
    """x [M, k] @ W.T -> [M, n] in x.dtype (arguments already checked by quant.device_kernels).

    interpreter_tiles: the interpreter's large tiles (default: when interpreted); False runs the GPU's tile sizes,
    which tests do under the interpreter to check exactly what a GPU would run."""
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    use_dot = m > 8
    if INTERPRETED if interpreter_tiles is None else interpreter_tiles:
        bm, bn, bk, warps = interpreter_config(qtype, m)
    else:
        bm, bn, bk, warps = gemm_config(qtype, m) if use_dot else gemv_config(qtype, m, n)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    matmul_kernel[grid](
        x, raw, out, m, n, k, x.stride(0), out.stride(0), row_bytes(qtype, k),
        QTYPE=int(qtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, num_warps=warps,
    )  # fmt: skip
    return out
