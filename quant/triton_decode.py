"""Decoding GGUF blocks in registers, for the Triton kernels of `quant.triton_blocks` and `quant.triton_moe`.

Two forms. `dequant_tile` (the tl.dot form, M > 8) builds a [BLOCK_N, BLOCK_K] tile of weights in element order as
[BLOCK_N, NG, G]: NG groups of G columns that share one scale (G = 32, or 16 for Q2_K, Q3_K and Q6_K), so each scale
is decoded once per group, not once per weight, and the tile is reshaped to [BLOCK_N, BLOCK_K] at the end. Column
index arithmetic ([NG, G]) is shared by all rows of the tile. The GEMV form (`triton_blocks.gemv`) loads whole blocks
field by field with the readers at the end of this module (`field`, `u16s`, `half`, `exact`, `k_scales`, `iq4`).
The bit layouts are gguf.quants' (which `quant/formats.py` follows bit for bit).

Rows are passed as a [BLOCK_N] vector of uint8 pointers to the first byte of each row, so the same helpers serve a
plain matrix and an expert inside a pool slot. Matrices start 16-byte aligned and every GGUF block size is even,
so every f16 field sits at an even address and is read through a uint16 pointer and bit-cast.
"""

from __future__ import annotations

import gguf
import triton
import triton.language as tl

# gguf.GGMLQuantizationType values: the kernels branch on these at compile time (QTYPE is a constexpr).
T_F32 = tl.constexpr(0)
T_F16 = tl.constexpr(1)
T_Q4_0 = tl.constexpr(2)
T_Q4_1 = tl.constexpr(3)
T_Q5_0 = tl.constexpr(6)
T_Q5_1 = tl.constexpr(7)
T_Q8_0 = tl.constexpr(8)
T_Q2_K = tl.constexpr(10)
T_Q3_K = tl.constexpr(11)
T_Q4_K = tl.constexpr(12)
T_Q5_K = tl.constexpr(13)
T_Q6_K = tl.constexpr(14)
T_IQ4_NL = tl.constexpr(20)
T_IQ4_XS = tl.constexpr(23)
T_BF16 = tl.constexpr(30)


def _iq4_word(levels: list[int]) -> int:
    """Eight IQ4_NL levels + 127 (0..240) as the bytes of one int64, level i in byte i (two's complement)."""
    word = sum((v + 127) << (8 * i) for i, v in enumerate(levels))
    return word - (1 << 64) if word >= 1 << 63 else word


# IQ4_NL's 16 non-linear levels (also IQ4_XS's), in two words: a lookup is a select, a shift and a mask, no memory.
_IQ4_LEVELS = [int(v) for v in gguf.quants.IQ4_NL.kvalues]
IQ4_LO = tl.constexpr(_iq4_word(_IQ4_LEVELS[:8]))
IQ4_HI = tl.constexpr(_iq4_word(_IQ4_LEVELS[8:]))


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
def _tile_q2_k(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 84, 16, BLOCK_K // 16)
    # scales[j] (bytes 0..16): scale in the low nibble, min in the high one; d and dmin at bytes 80 and 82
    sc = _u8(rows[:, None] + (blk + j)[None, :], gm)
    dl = _f16(rows, blk + 80, gm) * (sc & 15).to(tl.float32)
    ml = _f16(rows, blk + 82, gm) * (sc >> 4).to(tl.float32)
    # Half h = i // 128 uses qs[32h : 32h + 32] (bytes 16..80), its four runs of 32 items at shifts 0, 2, 4, 6.
    q = _u8(rows[:, None, None] + (blk[:, None] + 16 + 32 * (i >> 7) + (i & 31))[None], gm[:, :, None])
    q = (q >> (((i >> 5) & 3) * 2)[None]) & 3
    return dl[:, :, None] * q.to(tl.float32) - ml[:, :, None]


@triton.jit
def _tile_q3_k(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 110, 16, BLOCK_K // 16)
    # 6-bit scale j from the 12 bytes at 96: low four bits of byte j % 8 at shift 4 * (j // 8), top two of byte
    # 8 + j % 4 at shift 2 * (j // 4); minus 32. d at byte 108.
    lo = _u8(rows[:, None] + (blk + 96 + (j & 7))[None, :], gm) >> (4 * (j >> 3))[None, :]
    hi = _u8(rows[:, None] + (blk + 104 + (j & 3))[None, :], gm) >> (2 * (j >> 2))[None, :]
    dl = _f16(rows, blk + 108, gm) * (((lo & 15) | ((hi & 3) << 4)) - 32).to(tl.float32)
    # Low two bits as Q2_K's, from qs at byte 32; the third is bit i // 32 of hmask[i % 32] (bytes 0..32): set
    # means q, clear q - 4.
    ql = _u8(rows[:, None, None] + (blk[:, None] + 32 + 32 * (i >> 7) + (i & 31))[None], gm[:, :, None])
    ql = (ql >> (((i >> 5) & 3) * 2)[None]) & 3
    hm = _u8(rows[:, None, None] + (blk[:, None] + (i & 31))[None], gm[:, :, None])
    hm = (hm >> (i >> 5)[None]) & 1
    return dl[:, :, None] * ((ql | (hm << 2)) - 4).to(tl.float32)


@triton.jit
def _tile_iq4_nl(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 32, 18, 32, BLOCK_K // 32)
    d = _f16(rows, blk, gm)
    return d[:, :, None] * iq4(_nibble32(rows, blk, i, gm, 2))


@triton.jit
def _tile_iq4_xs(rows, rmask, k0, K, BLOCK_K: tl.constexpr):
    blk, j, i, gm = _groups(rmask, k0, K, 256, 136, 32, BLOCK_K // 32)
    # 6-bit scale of sub-block j: low four bits from scales_l (bytes 4..8) byte j // 2 at shift 4 * (j % 2), top
    # two from scales_h (the uint16 at byte 2) at shift 2j; minus 32. d at byte 0.
    lo = _u8(rows[:, None] + (blk + 4 + (j >> 1))[None, :], gm) >> (4 * (j & 1))[None, :]
    hi = _u8(rows[:, None] + (blk + 2 + (j >> 2))[None, :], gm) >> (2 * (j & 3))[None, :]
    dl = _f16(rows, blk, gm) * (((lo & 15) | ((hi & 3) << 4)) - 32).to(tl.float32)
    # Sub-block j: qs[16j : 16j + 16] (from byte 8), as IQ4_NL's 16 bytes: item c < 16 low nibble of byte c, else
    # the high nibble of byte c - 16.
    q = _u8(rows[:, None, None] + (blk[:, None] + 8 + 16 * (i >> 5) + (i & 15))[None], gm[:, :, None])
    q = (q >> (((i >> 4) & 1) * 4)[None]) & 15
    return dl[:, :, None] * iq4(q)


@triton.jit
def dequant_tile(rows, rmask, k0, K, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights [BLOCK_N, BLOCK_K] float32 at columns k0.. of the rows at `rows` (uint8 pointers [BLOCK_N]);
    rows with rmask false and columns >= K read as 0. K is a multiple of QTYPE's block; BLOCK_K a power of two
    and a multiple of the scale group (32; 16 for Q2_K, Q3_K and Q6_K; any for the float types), e.g. the whole
    block."""
    if QTYPE == T_F32:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.float32))[:, None] + kk[None, :]
        w = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
    elif QTYPE == T_F16:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.uint16))[:, None] + kk[None, :]
        bits = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0)
        w = bits.to(tl.float16, bitcast=True).to(tl.float32)
    elif QTYPE == T_BF16:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = rows.to(tl.pointer_type(tl.uint16))[:, None] + kk[None, :]
        bits = tl.load(ptrs, mask=rmask[:, None] & (kk < K)[None, :], other=0)
        w = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # bf16 is the top half of a float32
    else:
        if QTYPE == T_Q8_0:
            w3 = _tile_q8_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q4_0:
            w3 = _tile_q4_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q4_1:
            w3 = _tile_q4_1(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q5_0:
            w3 = _tile_q5_0(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q5_1:
            w3 = _tile_q5_1(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q4_K:
            w3 = _tile_q4_k(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q5_K:
            w3 = _tile_q5_k(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q2_K:
            w3 = _tile_q2_k(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_Q3_K:
            w3 = _tile_q3_k(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_IQ4_NL:
            w3 = _tile_iq4_nl(rows, rmask, k0, K, BLOCK_K)
        elif QTYPE == T_IQ4_XS:
            w3 = _tile_iq4_xs(rows, rmask, k0, K, BLOCK_K)
        else:
            tl.static_assert(QTYPE == T_Q6_K, "unsupported GGUF type")
            w3 = _tile_q6_k(rows, rmask, k0, K, BLOCK_K)
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
    return w


# ---------------------------------------------------------------------------------------------------------------
# GEMV field readers (see the comment above triton_blocks.gemv)


@triton.jit
def exact(q, bias: tl.constexpr):
    """float32(q - bias) for int32 0 <= q < 2^23, exactly, without an int-to-float conversion."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def ld(ptrs, mask, MASKED: tl.constexpr):
    """Weight bytes at ptrs, 0 where mask is false when MASKED (a tail step; unmasked loads need no zeroing or
    predicates). First out of L1: weights are used once (a 2-byte aligned field takes several loads per cache line,
    so they still go through L1), while x, which every program reads, should stay there."""
    if MASKED:
        v = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    else:
        v = tl.load(ptrs, eviction_policy="evict_first")
    return v


@triton.jit
def field(blocks, bmask, roff, L: tl.constexpr, MASKED: tl.constexpr):
    """int32 [BLOCK_N, NB, R, L]: bytes roff[r] + l (roff [R] int32) of each block (uint8 pointers [BLOCK_N, NB, 1, 1]),
    0 for blocks past the end (bmask [1, NB, 1, 1]). Contiguous along l: one run of L bytes per row, block and r."""
    return ld(blocks + roff[None, None, :, None] + tl.arange(0, L)[None, None, None, :], bmask, MASKED).to(tl.int32)


@triton.jit
def u16s(blocks, bmask, OFF: tl.constexpr, MASKED: tl.constexpr):
    """int32 [BLOCK_N, NB, 1, 1]: the uint16 at byte OFF (even) of each block."""
    return ld((blocks + OFF).to(tl.pointer_type(tl.uint16)), bmask, MASKED).to(tl.int32)


@triton.jit
def half(bits):
    """float32 of the f16 in the low 16 bits of int32 `bits`."""
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def k_scales(blocks, bmask, r, MASKED: tl.constexpr):
    """Q4_K/Q5_K: (d * scale, dmin * min) [BLOCK_N, NB, R, 1] float32 of sub-blocks 2r (low nibbles of chunk r) and
    2r + 1 (high nibbles), llama.cpp's get_scale_min_k4, from the block's first 16 bytes (16-byte aligned) loaded as
    four little-endian words: d and dmin, then the 12 scale bytes."""
    head = ld(blocks.to(tl.pointer_type(tl.uint32)) + tl.arange(0, 4)[None, None, None, :], bmask, MASKED)
    even, odd = tl.split(tl.reshape(head, (head.shape[0], head.shape[1], 2, 2)))  # [BLOCK_N, NB, 2]
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    d = half(w0 & 0xFFFF)[:, :, None, None]
    dmin = half(w0 >> 16)[:, :, None, None]
    sc_lo, mn_lo = _k_scale_min6(w1, w2, w3, 2 * r)
    sc_hi, mn_hi = _k_scale_min6(w1, w2, w3, 2 * r + 1)
    return d * sc_lo, dmin * mn_lo, d * sc_hi, dmin * mn_hi


@triton.jit
def _k_scale_min6(w1, w2, w3, j):
    """float32 (scale, min) [BLOCK_N, NB, R, 1] of sub-blocks j [R] from scale bytes 0..3, 4..7 and 8..11 (w1, w2,
    w3: little-endian words [BLOCK_N, NB])."""
    sh = ((j & 3) * 8)[None, None, :]
    a = (w1[:, :, None] >> sh) & 255  # byte j (j < 4), else byte j - 4
    b = (w2[:, :, None] >> sh) & 255  # byte 4 + j, else j
    c = (w3[:, :, None] >> sh) & 255  # byte 8 + j - 4 (j >= 4)
    hi = (j >= 4)[None, None, :]
    sc = tl.where(hi, (c & 15) | ((a >> 6) << 4), a & 63).to(tl.float32)[:, :, :, None]
    mn = tl.where(hi, (c >> 4) | ((b >> 6) << 4), b & 63).to(tl.float32)[:, :, :, None]
    return sc, mn


@triton.jit
def iq4(q):
    """float32 IQ4_NL level of each 4-bit index q (int32 0..15): byte q % 8 of IQ4_LO (q < 8) or IQ4_HI, minus 127."""
    word = tl.where(q < 8, IQ4_LO, IQ4_HI)
    return exact(((word >> ((q & 7) * 8).to(tl.int64)) & 255).to(tl.int32), 127.0)
