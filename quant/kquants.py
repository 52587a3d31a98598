"""Q4_K quantization: llama.cpp's reference `quantize_row_q4_K_ref` (with `make_qkx2_quants`), vectorised in numpy.

A Q4_K super-block holds 256 weights as 8 sub-blocks of 32. Each sub-block gets its own (scale, min), found by a
small search (`make_qkx2_quants`), and those 8 pairs are themselves quantized to 6 bits against the super-block's
fp16 `d` and `dmin`: w = d * sc_j * q - dmin * m_j, q in 0..15. All arithmetic is float32 as in the C code; sums
may round differently from C's sequential loops (numpy sums pairwise), which can flip a rare tie in the search.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_F = np.float32

# Sub-blocks processed per step: keeps the search's [B, 32] temporaries cache-friendly (~1 MB each).
_CHUNK = 4096


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """C's nearest_int: round half to even in float32 (the 1.5 * 2^23 trick)."""
    return np.rint(v).astype(np.int32)


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (scale, min) search for each row of `x` [B, n] with weights `w` (squared error, not MAD).

    Returns (scale [B], the_min [B] >= 0, L [B, n] uint8) such that x ~ scale * L - the_min.

    Speed: row sums are matrix-vector products with a ones vector (BLAS; numpy's axis sums over 32 items are
    several times slower), and each candidate's error sum w (s L + m - x)^2 is expanded into the weighted sums the
    search already has (in float64), instead of a second pass over the weights. C sums the same terms in float32,
    so the two can pick differently only between candidates whose errors agree to ~1e-4 (equally good).
    """
    ones = np.ones(x.shape[1], dtype=_F)
    mn = np.minimum(x.min(axis=1), _F(0))  # [B]
    mx = x.max(axis=1)
    wx = w * x
    sum_w, sum_x, sum_x2 = w @ ones, wx @ ones, (wx * x) @ ones
    flat = mx == mn
    rng = np.where(flat, _F(1), mx - mn)  # avoid 0/0 on flat rows; they are reset at the end
    xm = x - mn[:, None]
    lf, u = np.empty_like(x), np.empty_like(x)
    sw, sx, sx2 = sum_w.astype(np.float64), sum_x.astype(np.float64), sum_x2.astype(np.float64)

    def levels(iscale: np.ndarray) -> np.ndarray:  # clip(nearest_int(iscale * (x - min)), 0, nmax), as float
        np.multiply(xm, iscale[:, None], out=lf)
        np.rint(lf, out=lf)
        return np.clip(lf, 0, nmax, out=lf)

    def level_sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # sum wL, sum wL^2, sum wxL
        levels(iscale)
        np.multiply(w, lf, out=u)
        return u @ ones, np.multiply(u, lf, out=u) @ ones, np.multiply(wx, lf, out=u) @ ones

    def sq_error(s, m, sl, sl2, sxl) -> np.ndarray:  # sum w (s L + m - x)^2, expanded
        s, m = s.astype(np.float64), m.astype(np.float64)
        sl, sl2, sxl = sl.astype(np.float64), sl2.astype(np.float64), sxl.astype(np.float64)
        return s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sw - 2 * m * sx + sx2

    best_iscale = _F(nmax) / rng
    scale = _F(1) / best_iscale
    best = sq_error(scale, mn, *level_sums(best_iscale))
    best_min = mn
    for step in range(nstep + 1):
        iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / rng
        sum_l, sum_l2, sum_xl = level_sums(iscale)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = np.where(ok, D, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, _F(0), this_min)
        with np.errstate(invalid="ignore"):
            mad = sq_error(this_scale, this_min, sum_l, sum_l2, sum_xl)
            better = ok & (mad < best)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
        best_iscale = np.where(better, iscale, best_iscale)
    L = levels(best_iscale).astype(np.uint8)  # the winning step's levels, recomputed rather than kept per step
    L[flat] = 0
    scale = np.where(flat, _F(0), scale)
    return scale.astype(_F), (-best_min).astype(_F), L


def _quantize_superblocks(x: np.ndarray) -> np.ndarray:
    """x: float32 [nb, 256] -> Q4_K blocks uint8 [nb, 144]."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1, dtype=_F) / _F(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), _F(0))  # [nb]
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)  # [nb, 8]
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    d16 = (max_scale / _F(63)).astype(np.float16)
    dmin16 = (max_min / _F(63)).astype(np.float16)

    # Re-quantize each sub-block against the 6-bit scales actually stored; keep the search's L where d == 0.
    d = d16.astype(_F)[:, None] * ls.astype(_F)  # [nb, 8]
    dm = dmin16.astype(_F)[:, None] * lm.astype(_F)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dm[..., None]) / d[..., None]), 0, 15)
    L = np.where(nz[..., None], lq, L).astype(np.uint8)

    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = d16.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin16.reshape(nb, 1).view(np.uint8)
    out[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 12:16] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    pairs = L.reshape(nb, 4, 2, 32)  # byte l of chunk c: sub-block 2c in the low nibble, 2c+1 in the high
    out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    return out


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., k*256] -> Q4_K bytes uint8 [..., k*144]."""
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    flat = np.ascontiguousarray(x, dtype=_F).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], 144), dtype=np.uint8)
    step = _CHUNK // 8
    for i in range(0, flat.shape[0], step):
        out[i : i + step] = _quantize_superblocks(flat[i : i + step])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)
