"""Triton kernels that multiply by raw GGUF blocks: the matmul kernel, its GEMV form, and their tile sizes.

Imported lazily by `quant.device_kernels` (this module needs triton). Whether the kernels are compiled for the GPU
or run by triton's CPU interpreter is decided when this module is imported (`TRITON_INTERPRET=1` at that moment).

The tl.dot form (M > 8) dequantizes a [BLOCK_N, BLOCK_K] tile of weights inside its K loop, straight from the GGUF
bytes (`quant.triton_decode.dequant_tile`), and multiplies in float32. The GEMV form (M <= 8, decode) is `gemv`,
which loads whole blocks field by field (see the comment above it) with the readers of `quant.triton_decode`.
Rows are passed as a [BLOCK_N] vector of uint8 pointers to the first byte of each row, so the same code serves a
plain matrix and an expert inside a pool slot.
"""

from __future__ import annotations

import gguf
import torch
import triton
import triton.language as tl

from quant.triton_decode import (
    T_BF16,
    T_F16,
    T_F32,
    T_IQ4_NL,
    T_IQ4_XS,
    T_Q2_K,
    T_Q3_K,
    T_Q4_0,
    T_Q4_1,
    T_Q4_K,
    T_Q5_0,
    T_Q5_1,
    T_Q5_K,
    T_Q6_K,
    T_Q8_0,
    dequant_tile,
    exact,
    field,
    half,
    iq4,
    k_scales,
    ld,
    u16s,
)

Q = gguf.GGMLQuantizationType

# tl.dot on float32 tiles: three TF32 passes (~float32 accuracy on tensor cores); plain "tf32" keeps ~10 bits.
DOT_PRECISION = tl.constexpr("tf32x3")


def block_elems(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: Q, k: int) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return k // bs * ts


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
# GEMV (M <= 8): whole GGUF blocks per step, each weight byte loaded once, no cross-thread reduction in the K loop
#
# `dequant_tile` builds a weight tile in element order: every weight issues its own 1-byte gather load through index
# arithmetic the compiler cannot prove contiguous (a byte holding two nibbles is loaded twice), and `accumulate`
# reduces across threads at every K step. `gemv` instead loads, per step of NB whole blocks, each field of each block
# as one contiguous [BLOCK_N, NB, R, L] tile (last axis `tl.arange`: R runs of L bytes per block, vectorised as wide
# as the block's alignment allows), splits nibbles and bit fields with masks on the loaded tile, and loads x in the
# matching (permuted) order instead of moving weights into element order. Products go into an elementwise
# accumulator of the tile's shape (one per row of x, joined on trailing axes of 2), reduced once after the loop.
# Small integers become float32 without an int-to-float conversion (slow on NVIDIA GPUs): their bits under the
# exponent of 2^23, minus 2^23. High nibbles are used in place (16 q: bits 4..7 kept) with the scale divided by 16,
# which is exact.
#
# What keeps triton from moving data between threads (shared memory and a barrier at every step) in that loop, as
# read off the sm_90 PTX/SASS: x is loaded in the weight tile's own shape (its pointers broadcast over the rows), so
# both loads get the same register layout (each thread loads the x values its weights meet; x is small and stays in
# L1, while weights are loaded "evict_first"); per-block fields (scales) are loaded as [BLOCK_N, NB, ...] tensors
# with fewer elements than threads, which triton then loads straight into the layout that uses them (see
# `gemv_tiles`); and all index vectors are 4-D from the start.
#
# Alignment: rows start at a multiple of gcd(16, block bytes) from a 16-byte aligned matrix (`aligned_rows` makes this
# visible to the compiler), so Q4_K and Q5_K fields (144- and 176-byte blocks) load 16 bytes per instruction, Q5_1
# and IQ4_XS 8, Q4_1 and Q2_K 4, and the 2-byte aligned blocks (Q8_0 34, Q4_0 and IQ4_NL 18, Q5_0 22, Q3_K 110, Q6_K
# 210 bytes) 2 bytes per instruction: a wider load of
# a block at an odd multiple of 2 is not allowed. (Loading a group of such blocks as one aligned byte range does not
# help here: splitting it into blocks needs a gather across threads, and x would then be read at unaligned offsets.)


@triton.jit
def aligned_rows(base, rn, row_bytes, QTYPE: tl.constexpr):
    """uint8 pointers [BLOCK_N] to rows rn of a matrix at `base` with rows of row_bytes, written so that the compiler
    knows each row is as aligned as `base` up to gcd(16, block bytes), which divides every row stride of the type."""
    A16: tl.constexpr = QTYPE == T_Q4_K or QTYPE == T_Q5_K
    A8: tl.constexpr = QTYPE == T_Q5_1 or QTYPE == T_IQ4_XS
    A4: tl.constexpr = QTYPE == T_Q4_1 or QTYPE == T_Q2_K or QTYPE == T_F32
    A: tl.constexpr = 16 if A16 else 8 if A8 else 4 if A4 else 2
    return base + rn.to(tl.int64) * (row_bytes // A) * A


@triton.jit
def _x(x_row, stride_xm, m_left, e, emask, i: tl.constexpr, MASKED: tl.constexpr):
    """float32, the shape of e: row i of x (x_row + i * stride_xm) at columns e; 0 past the rows or where masked.
    Row 0 always exists (every program has at least one row of x)."""
    ptrs = x_row + i * stride_xm + e
    if i == 0:
        x = tl.load(ptrs, mask=emask, other=0.0) if MASKED else tl.load(ptrs)
    else:
        mask = tl.full(e.shape, i, tl.int32) < m_left  # (a scalar comparison here trips the interpreter)
        if MASKED:
            mask = mask & emask
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _mac(acc, w, x_row, stride_xm, m_left, e, emask, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """acc += w * x for each row of x: w [BLOCK_N, NB, R, L] float32, e the columns of x it meets (same shape).
    acc is [BLOCK_N, NB, R, L] for one row of x, else [BLOCK_N, NB, R, L, 2, ...] with row m at trailing index
    (m >> 2 & 1, m >> 1 & 1, m & 1) for 8 rows ((m >> 1, m & 1) for 4, m for 2), so that a reshape of the trailing
    axes lists the rows in order (tl.join appends an axis: hence the bit-reversed pairing below)."""
    if BLOCK_M == 1:
        acc += w * _x(x_row, stride_xm, m_left, e, emask, 0, MASKED)
    elif BLOCK_M == 2:
        x0 = _x(x_row, stride_xm, m_left, e, emask, 0, MASKED)
        x1 = _x(x_row, stride_xm, m_left, e, emask, 1, MASKED)
        acc += tl.join(w * x0, w * x1)
    elif BLOCK_M == 4:
        x0 = _x(x_row, stride_xm, m_left, e, emask, 0, MASKED)
        x1 = _x(x_row, stride_xm, m_left, e, emask, 1, MASKED)
        x2 = _x(x_row, stride_xm, m_left, e, emask, 2, MASKED)
        x3 = _x(x_row, stride_xm, m_left, e, emask, 3, MASKED)
        acc += tl.join(tl.join(w * x0, w * x2), tl.join(w * x1, w * x3))
    else:
        tl.static_assert(BLOCK_M == 8, "GEMV BLOCK_M is 1, 2, 4 or 8")
        x0 = _x(x_row, stride_xm, m_left, e, emask, 0, MASKED)
        x1 = _x(x_row, stride_xm, m_left, e, emask, 1, MASKED)
        x2 = _x(x_row, stride_xm, m_left, e, emask, 2, MASKED)
        x3 = _x(x_row, stride_xm, m_left, e, emask, 3, MASKED)
        x4 = _x(x_row, stride_xm, m_left, e, emask, 4, MASKED)
        x5 = _x(x_row, stride_xm, m_left, e, emask, 5, MASKED)
        x6 = _x(x_row, stride_xm, m_left, e, emask, 6, MASKED)
        x7 = _x(x_row, stride_xm, m_left, e, emask, 7, MASKED)
        even = tl.join(tl.join(w * x0, w * x4), tl.join(w * x2, w * x6))
        odd = tl.join(tl.join(w * x1, w * x5), tl.join(w * x3, w * x7))
        acc += tl.join(even, odd)
    return acc


@triton.jit
def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, R: tl.constexpr, L: tl.constexpr):
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, NB, R, L), dtype=tl.float32)
    elif BLOCK_M == 2:
        acc = tl.zeros((BLOCK_N, NB, R, L, 2), dtype=tl.float32)
    elif BLOCK_M == 4:
        acc = tl.zeros((BLOCK_N, NB, R, L, 2, 2), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, NB, R, L, 2, 2, 2), dtype=tl.float32)
    return acc


@triton.jit
def _acc_out(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulator summed over blocks and columns: [BLOCK_M, BLOCK_N]."""
    acc = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if BLOCK_M == 1:
        out = acc[None, :]
    else:
        out = tl.trans(tl.reshape(acc, (BLOCK_N, BLOCK_M)))
    return out


@triton.jit
def gemv(x_row, stride_xm, m_left, rows, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):  # fmt: skip
    """float32 [BLOCK_M, BLOCK_N]: rows i < min(BLOCK_M, m_left) of x (x_row + i * stride_xm, K values; m_left >= 1)
    times the weight rows at `rows` (uint8 pointers [BLOCK_N], all valid: callers repeat the last row rather than mask),
    over K columns (a whole number of QTYPE's blocks), in steps of BLOCK_K columns (a power of two and a multiple of
    the type's block): unmasked steps, then one masked step for the rest of K if any."""
    # QK columns in TS bytes per block; the tile of a step is [BLOCK_N, NB, R, L]
    FLOAT: tl.constexpr = QTYPE == T_F32 or QTYPE == T_F16 or QTYPE == T_BF16
    B32: tl.constexpr = (
        QTYPE == T_Q8_0 or QTYPE == T_Q4_0 or QTYPE == T_Q4_1 or QTYPE == T_Q5_0 or QTYPE == T_Q5_1 or QTYPE == T_IQ4_NL
    )
    B256: tl.constexpr = (
        QTYPE == T_Q2_K or QTYPE == T_Q3_K or QTYPE == T_Q4_K or QTYPE == T_Q5_K or QTYPE == T_Q6_K or QTYPE == T_IQ4_XS
    )
    tl.static_assert(FLOAT or B32 or B256, "unsupported GGUF type")
    QK: tl.constexpr = 1 if FLOAT else 32 if B32 else 256
    TS32: tl.constexpr = (
        34 if QTYPE == T_Q8_0 else 20 if QTYPE == T_Q4_1 else 22 if QTYPE == T_Q5_0 else 24 if QTYPE == T_Q5_1 else 18
    )  # 18: Q4_0, IQ4_NL
    TS256: tl.constexpr = (
        84 if QTYPE == T_Q2_K else 110 if QTYPE == T_Q3_K else 144 if QTYPE == T_Q4_K else 176 if QTYPE == T_Q5_K
        else 136 if QTYPE == T_IQ4_XS else 210
    )  # fmt: skip
    TS: tl.constexpr = (4 if QTYPE == T_F32 else 2) if FLOAT else TS32 if B32 else TS256
    R: tl.constexpr = 8 if QTYPE == T_IQ4_XS else 4 if QK == 256 else 1
    L: tl.constexpr = BLOCK_K if FLOAT else 32 if QTYPE == T_Q8_0 or QTYPE == T_Q4_K or QTYPE == T_Q5_K else 16
    NB: tl.constexpr = 1 if QK == 1 else BLOCK_K // QK
    nsteps = K // BLOCK_K  # whole steps (K is a whole number of blocks)
    acc = _acc_zeros(BLOCK_M, BLOCK_N, NB, R, L)
    for step in range(0, nsteps):
        acc = _gemv_step(acc, x_row, stride_xm, m_left, rows, K, step * BLOCK_K, QTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
                         QK, TS, NB, R, L, False)  # fmt: skip
    if nsteps * BLOCK_K < K:
        acc = _gemv_step(acc, x_row, stride_xm, m_left, rows, K, nsteps * BLOCK_K, QTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
                         QK, TS, NB, R, L, True)  # fmt: skip
    return _acc_out(acc, BLOCK_M, BLOCK_N)


@triton.jit
def _gemv_step(acc, x_row, stride_xm, m_left, rows, K, k0, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, NB: tl.constexpr,
               R: tl.constexpr, L: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One step of `gemv`: columns k0 .. k0 + BLOCK_K (NB blocks of QK columns; the tile [BLOCK_N, NB, R, L])."""
    rows4 = rows[:, None, None, None]
    zero_rows = tl.zeros((BLOCK_N, 1, 1, 1), dtype=tl.int32)
    if QK == 1:
        kk = (k0 + tl.arange(0, BLOCK_K))[None, None, None, :]
        kmask = kk < K
        if QTYPE == T_F32:
            w = ld(rows4.to(tl.pointer_type(tl.float32)) + kk, kmask, MASKED)
        else:
            bits = ld(rows4.to(tl.pointer_type(tl.uint16)) + kk, kmask, MASKED)
            if QTYPE == T_F16:
                w = bits.to(tl.float16, bitcast=True).to(tl.float32)
            else:
                w = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # bf16: the top half of a float32
        acc = _mac(acc, w, x_row, stride_xm, m_left, kk + zero_rows, kmask, BLOCK_M, MASKED)
    else:
        r = tl.arange(0, R)
        r4 = r[None, None, :, None]
        blk = (k0 // QK + tl.arange(0, NB))[None, :, None, None]
        bm = blk < K // QK  # [1, NB, 1, 1]: blocks in range (used only by the masked step)
        blocks = rows4 + blk * TS  # [BLOCK_N, NB, 1, 1]: each block's first byte
        # col + offset of run r: the x columns met by a [BLOCK_N, NB, R, L] weight tile
        col = blk * QK + tl.arange(0, L)[None, None, None, :] + zero_rows
        if QTYPE == T_Q8_0:
            q = exact(field(blocks, bm, 2 + r, 32, MASKED) ^ 0x80, 128.0)  # int8: (q + 128) - 128
            w = half(u16s(blocks, bm, 0, MASKED)) * q
            acc = _mac(acc, w, x_row, stride_xm, m_left, col + r4, bm, BLOCK_M, MASKED)
        elif QTYPE == T_Q4_K or QTYPE == T_Q5_K:
            # Chunk r (64 columns) uses qs[32r : 32r + 32]: low nibbles are columns 64r + l (sub-block 2r), high
            # nibbles 64r + 32 + l (sub-block 2r + 1). Q5_K: the 5th bit of column l of sub-block j is bit j of qh[l]
            # (qh loaded once per chunk: the same 32 bytes four times, from the cache).
            dd_lo, dm_lo, dd_hi, dm_hi = k_scales(blocks, bm, r, MASKED)
            if QTYPE == T_Q4_K:
                qs = field(blocks, bm, 16 + 32 * r, 32, MASKED)
                lo = qs & 15
                hi = qs & 0xF0
            else:
                qs = field(blocks, bm, 48 + 32 * r, 32, MASKED)
                qh = field(blocks, bm, 16 + 0 * r, 32, MASKED) >> (2 * r4)
                lo = (qs & 15) | ((qh & 1) << 4)
                hi = (qs & 0xF0) | ((qh & 2) << 7)
            w = dd_lo * exact(lo, 0.0) - dm_lo
            acc = _mac(acc, w, x_row, stride_xm, m_left, col + 64 * r4, bm, BLOCK_M, MASKED)
            w = (dd_hi * 0.0625) * exact(hi, 0.0) - dm_hi
            acc = _mac(acc, w, x_row, stride_xm, m_left, col + 64 * r4 + 32, bm, BLOCK_M, MASKED)
        elif QTYPE == T_Q6_K:
            # Run r = 2h + t (h: which 128 columns, t: which 16 of 32): for s in 0, 1, ql byte 64h + 32s + 16t + l
            # holds column 128h + 32s + 16t + l (low nibble, scale 8h + 2s + t) and column 64 more (high nibble,
            # scale 4 more); qh byte 128 + 32h + 16t + l their top two bits, at shifts 2s and 4 + 2s.
            d = half(u16s(blocks, bm, 208, MASKED))
            qh = field(blocks, bm, 128 + 16 * r, 16, MASKED)
            run = 64 * (r >> 1) + 16 * (r & 1)
            for s in tl.static_range(2):
                ql = field(blocks, bm, run + 32 * s, 16, MASKED)
                qh_s = qh << (4 - 2 * s)  # the low nibble's two bits at 4..5, the high nibble's at 8..9
                for nib in tl.static_range(2):
                    g = 192 + 8 * (r4 >> 1) + (r4 & 1) + 2 * s + 4 * nib  # scale byte of each run
                    sc = ld(blocks + g, bm, MASKED).to(tl.int8, bitcast=True).to(tl.float32)
                    if nib == 0:
                        w = (d * sc) * exact((ql & 15) | (qh_s & 0x30), 32.0)
                    else:
                        w = (d * sc * 0.0625) * exact((ql & 0xF0) | (qh_s & 0x300), 512.0)
                    xo = 128 * (r4 >> 1) + 16 * (r4 & 1) + 32 * s + 64 * nib
                    acc = _mac(acc, w, x_row, stride_xm, m_left, col + xo, bm, BLOCK_M, MASKED)
        elif QTYPE == T_Q2_K or QTYPE == T_Q3_K:
            # Run r = 2h + t (h: which 128 columns, t: which 16 of 32): byte l of the run's 16 qs bytes holds at shift
            # 2s the low two bits of column 128h + 32s + 16t + l, whose scale is number j = 8h + 2s + t.
            if QTYPE == T_Q2_K:
                # qs from byte 16; scale byte j: the scale in its low nibble, the min in its high one
                qs = field(blocks, bm, 16 + 16 * r, 16, MASKED)
                d = half(u16s(blocks, bm, 80, MASKED))
                dmin = half(u16s(blocks, bm, 82, MASKED))
            else:
                # qs from byte 32; the third bit is bit 4h + s of hmask byte 16t + l (set: q, clear: q - 4)
                qs = field(blocks, bm, 32 + 16 * r, 16, MASKED)
                hm = field(blocks, bm, 16 * (r & 1), 16, MASKED) >> (4 * (r4 >> 1))
                d = half(u16s(blocks, bm, 108, MASKED))
            for s in tl.static_range(4):
                j = 8 * (r4 >> 1) + (r4 & 1) + 2 * s  # [1, 1, R, 1]
                q = (qs >> (2 * s)) & 3
                if QTYPE == T_Q2_K:
                    sc = ld(blocks + j, bm, MASKED).to(tl.int32)
                    w = (d * exact(sc & 15, 0.0)) * exact(q, 0.0) - dmin * exact(sc >> 4, 0.0)
                else:
                    # the 6-bit scale j: low four bits of byte 96 + j % 8 at shift 4 * (j // 8), top two of byte
                    # 104 + j % 4 at shift 2 * (j // 4); minus 32
                    lo = ld(blocks + 96 + (j & 7), bm, MASKED).to(tl.int32) >> (4 * (j >> 3))
                    hi = ld(blocks + 104 + (j & 3), bm, MASKED).to(tl.int32) >> (2 * (j >> 2))
                    w = (d * exact((lo & 15) | ((hi & 3) << 4), 32.0)) * exact(q | (((hm >> s) & 1) << 2), 4.0)
                xo = 128 * (r4 >> 1) + 16 * (r4 & 1) + 32 * s
                acc = _mac(acc, w, x_row, stride_xm, m_left, col + xo, bm, BLOCK_M, MASKED)
        elif QTYPE == T_IQ4_XS:
            # Run r = sub-block r (32 columns): qs bytes 8 + 16r + l hold columns 32r + l (low nibble) and 32r + 16 + l
            # (high). Its 6-bit scale: low four bits at bit 4r of the little-endian word at byte 4 (scales_l: byte
            # r // 2, shift 4 * (r % 2)), top two at bit 2r of the uint16 at byte 2; minus 32.
            lo = ld((blocks + 4).to(tl.pointer_type(tl.uint32)), bm, MASKED).to(tl.int32, bitcast=True) >> (4 * r4)
            hi = u16s(blocks, bm, 2, MASKED) >> (2 * r4)
            dl = half(u16s(blocks, bm, 0, MASKED)) * exact((lo & 15) | ((hi & 3) << 4), 32.0)
            qs = field(blocks, bm, 8 + 16 * r, 16, MASKED)
            acc = _mac(acc, dl * iq4(qs & 15), x_row, stride_xm, m_left, col + 32 * r4, bm, BLOCK_M, MASKED)
            acc = _mac(acc, dl * iq4(qs >> 4), x_row, stride_xm, m_left, col + 32 * r4 + 16, bm, BLOCK_M, MASKED)
        else:
            # 32-column blocks of nibbles: qs byte l holds column l (low nibble) and 16 + l (high).
            d = half(u16s(blocks, bm, 0, MASKED))
            if QTYPE == T_Q4_0:
                qs = field(blocks, bm, 2 + r, 16, MASKED)
                w_lo = d * exact(qs & 15, 8.0)
                w_hi = (d * 0.0625) * exact(qs & 0xF0, 128.0)
            elif QTYPE == T_Q4_1:
                m = half(u16s(blocks, bm, 2, MASKED))
                qs = field(blocks, bm, 4 + r, 16, MASKED)
                w_lo = d * exact(qs & 15, 0.0) + m
                w_hi = (d * 0.0625) * exact(qs & 0xF0, 0.0) + m
            elif QTYPE == T_IQ4_NL:
                qs = field(blocks, bm, 2 + r, 16, MASKED)
                w_lo = d * iq4(qs & 15)
                w_hi = d * iq4(qs >> 4)
            elif QTYPE == T_Q5_1:
                # d, m, then qh (the little-endian uint32 at byte 4, bit i the 5th bit of column i), then qs
                m = half(u16s(blocks, bm, 2, MASKED))
                sh = tl.arange(0, 16)[None, None, None, :]
                qs = field(blocks, bm, 8 + r, 16, MASKED)
                w_lo = d * exact((qs & 15) | (((u16s(blocks, bm, 4, MASKED) >> sh) & 1) << 4), 0.0) + m
                w_hi = (d * 0.0625) * exact((qs & 0xF0) | (((u16s(blocks, bm, 6, MASKED) >> sh) & 1) << 8), 0.0) + m
            else:
                tl.static_assert(QTYPE == T_Q5_0, "unsupported GGUF type")
                # qh: the little-endian uint32 at byte 2 (2-byte aligned: two halves), bit i the 5th bit of column i.
                sh = tl.arange(0, 16)[None, None, None, :]
                qs = field(blocks, bm, 6 + r, 16, MASKED)
                w_lo = d * exact((qs & 15) | (((u16s(blocks, bm, 2, MASKED) >> sh) & 1) << 4), 16.0)
                w_hi = (d * 0.0625) * exact((qs & 0xF0) | (((u16s(blocks, bm, 4, MASKED) >> sh) & 1) << 8), 256.0)
            acc = _mac(acc, w_lo, x_row, stride_xm, m_left, col + r4, bm, BLOCK_M, MASKED)
            acc = _mac(acc, w_hi, x_row, stride_xm, m_left, col + 16 + r4, bm, BLOCK_M, MASKED)
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
    rows = aligned_rows(w_ptr, tl.minimum(rn, N - 1), w_row_bytes, QTYPE)  # rows past N repeat the last one
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    if USE_DOT:
        x_rows = x_ptr + rm.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows[:, None] + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            w = dequant_tile(rows, nmask, k0, K, QTYPE, BLOCK_N, BLOCK_K)
            acc = accumulate(acc, x.to(tl.float32), w, USE_DOT)
    else:
        m0 = pid_m * BLOCK_M
        acc = gemv(x_ptr + m0.to(tl.int64) * stride_xm, stride_xm, M - m0, rows, K, QTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


INTERPRETED = not isinstance(matmul_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 when imported


GEMV_PROGRAMS = 4 * 132  # enough programs for every SM of an H100 (132 SMs) several times over
GEMV_THREADS = 128  # num_warps 4


def gemv_tiles(qtype: Q, n: int, k: int, weights_per_thread: int, threads: int = GEMV_THREADS) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a GEMV step of about weights_per_thread weights per thread, and fewer blocks per step
    than threads (BLOCK_N * NB < threads: a per-block field, e.g. a scale, is then cheap enough for triton to load
    straight into the layout of the tile that uses it; with more, it goes through shared memory at every step).
    BLOCK_N is halved (down to 1) until there are GEMV_PROGRAMS programs, BLOCK_K is the rest of the tile (at most K
    rounded up to a power of two), then halved while the last step would be more than 1/8 padding."""
    qk = max(block_elems(qtype), 32)
    tile = min(weights_per_thread * threads, qk * threads // 2)
    bn = max(1, tile // qk)
    while bn > 1 and triton.cdiv(n, bn) < GEMV_PROGRAMS:
        bn //= 2
    bk = max(qk, min(tile // bn, _pow2_at_least(k)))
    while bk > qk and (triton.cdiv(k, bk) * bk - k) * 8 > k:
        bk //= 2
    return bn, bk


def gemv_weights_per_thread(m: int) -> int:
    """Weights per thread per step for m rows of x (each weight of a step holds m accumulators)."""
    return {1: 32, 2: 32, 4: 16, 8: 8}[_pow2_at_least(m)]


def gemv_config(qtype: Q, m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M <= 8: all rows of x in one program (BLOCK_M 1, 2, 4 or 8), about
    32 weights per thread per step for one row of x (16 bytes of Q4_K: one 16-byte load per thread), 16 for the
    32-column block types, fewer for more rows of x. Untuned guesses for an H100."""
    bn, bk = gemv_tiles(qtype, n, k, gemv_weights_per_thread(m))
    return _pow2_at_least(m), bn, bk, GEMV_THREADS // 32


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
        bm, bn, bk, warps = gemm_config(qtype, m) if use_dot else gemv_config(qtype, m, n, k)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    matmul_kernel[grid](
        x, raw, out, m, n, k, x.stride(0), out.stride(0), row_bytes(qtype, k),
        QTYPE=int(qtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, num_warps=warps,
    )  # fmt: skip
    return out
