"""Test oracle: llama.cpp's K-quant reference quantizers (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c) in numpy.

A line-by-line port, vectorised across sub-blocks only: every sub-block runs the reference's own sequential
loops (value by value, search step by step), and every operation is a single float32 numpy operation in the
reference's order, so the result is the reference's bytes. Slow (a Python loop per value and step); for tests.
The native quantizers (`quant/csrc/quantize_kquants.inc`) are checked against it.
"""

from __future__ import annotations

import numpy as np

F = np.float32
QK_K = 256
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the bits of v + 1.5 * 2^23 (round half to even; the same wrapped value beyond 2^22)."""
    with np.errstate(over="ignore", invalid="ignore"):
        t = (np.asarray(v, dtype=F) + F(12582912.0)).astype(F)
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def _f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F).astype(np.float16)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """x, w: float32 [B, n] -> (scale [B], the_min [B], L [B, n]); use_mad = false."""
    n = x.shape[1]
    with np.errstate(all="ignore"):  # inputs may hold inf; lanes the reference leaves early compute garbage
        mn, mx = x[:, 0].copy(), x[:, 0].copy()
        sum_w = w[:, 0].copy()
        sum_x = sum_w * x[:, 0]
        for i in range(1, n):
            mn = np.where(x[:, i] < mn, x[:, i], mn)
            mx = np.where(x[:, i] > mx, x[:, i], mx)
            sum_w = sum_w + w[:, i]
            sum_x = sum_x + w[:, i] * x[:, i]
        mn = np.where(mn > 0, F(0), mn)
        flat = mx == mn
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        L = np.empty(x.shape, dtype=np.int32)
        best = np.zeros(x.shape[0], F)
        for i in range(n):
            L[:, i] = np.clip(nearest_int(iscale * (x[:, i] - mn)), 0, nmax)
            diff = scale * L[:, i].astype(F) + mn - x[:, i]
            best = best + w[:, i] * (diff * diff)
        laux = np.empty_like(L)
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            sl = np.zeros(x.shape[0], F)
            sl2, sxl = sl.copy(), sl.copy()
            for i in range(n):
                laux[:, i] = np.clip(nearest_int(iscale * (x[:, i] - mn)), 0, nmax)
                lf = laux[:, i].astype(F)
                wl = w[:, i] * lf
                sl, sl2, sxl = sl + wl, sl2 + wl * lf, sxl + wl * x[:, i]
            D = sum_w * sl2 - sl * sl
            this_scale = (sum_w * sxl - sum_x * sl) / D
            this_min = (sl2 * sum_x - sl * sxl) / D
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min)
            this_scale = np.where(pos, sxl / sl2, this_scale)
            cur = np.zeros(x.shape[0], F)
            for i in range(n):
                diff = this_scale * laux[:, i].astype(F) + this_min - x[:, i]
                cur = cur + w[:, i] * (diff * diff)
            better = (D > 0) & (cur < best)
            L = np.where(better[:, None], laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L[flat] = 0
    return np.where(flat, F(0), scale).astype(F), (-mn).astype(F), L


def _quantize_qk(x: np.ndarray, nmax: int) -> np.ndarray:
    """float32 [nb, 256] -> Q4_K (nmax 15) or Q5_K (nmax 31) blocks."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, F)
    with np.errstate(all="ignore"):
        for i in range(32):
            sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
        av_x = np.sqrt(sum_x2 / F(32))
        w = av_x[:, None] + np.abs(sub)
    args = (31, -0.5, 0.1, 15) if nmax == 31 else (15, -1.0, 0.1, 20)
    scales, mins, L = make_qkx2_quants(sub, w, *args)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F(0))
    max_min = np.maximum(mins.max(axis=1), F(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
        d16, dmin16 = _f16(max_scale / F(63)), _f16(max_min / F(63))
        d = d16.astype(F)[:, None] * ls.astype(F)
        dm = dmin16.astype(F)[:, None] * lm.astype(F)
        lq = np.clip(nearest_int((x.reshape(nb, 8, 32) + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], lq, L).astype(np.uint8)

    head = np.empty((nb, 16), dtype=np.uint8)
    head[:, 0:2] = d16.reshape(nb, 1).view(np.uint8)
    head[:, 2:4] = dmin16.reshape(nb, 1).view(np.uint8)
    head[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    head[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    head[:, 12:16] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    pairs = L.reshape(nb, 4, 2, 32)  # byte l of chunk c: value l of sub-block 2c (low), of 2c+1 (high)
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(nb, 128)
    if nmax == 15:
        return np.concatenate([head, qs], axis=1)
    hi = (L.reshape(nb, 8, 32) >> 4).astype(np.uint8)  # bit j of qh[l]: the 5th bit of value l of sub-block j
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j] << j
    return np.concatenate([head, qh, qs], axis=1)


def make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [B, n] -> (scale [B], L [B, n] = level + nmax); rmse_type 1, no weights."""
    B, n = x.shape
    mx, amax = np.zeros(B, F), np.zeros(B, F)
    for i in range(n):
        ax = np.abs(x[:, i])
        upd = ax > amax
        amax, mx = np.where(upd, ax, amax), np.where(upd, x[:, i], mx)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(all="ignore"):

        def levels(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            L = np.empty((B, n), dtype=np.int32)
            sumlx, suml2 = np.zeros(B, F), np.zeros(B, F)
            for i in range(n):
                L[:, i] = np.clip(nearest_int(iscale * x[:, i]), -nmax, nmax - 1)
                lf, w = L[:, i].astype(F), x[:, i] * x[:, i]
                sumlx, suml2 = sumlx + w * x[:, i] * lf, suml2 + w * lf * lf
            return L, sumlx, suml2

        L, sumlx, suml2 = levels(F(-nmax) / mx)
        L = L + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
        best = scale * sumlx
        for step in [s for s in range(-9, 10) if s]:
            Lc, sumlx, suml2 = levels(-(F(nmax) + F(0.1) * F(step)) / mx)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(upd[:, None], Lc + nmax, L)
            scale = np.where(upd, sumlx / suml2, scale)
            best = np.where(upd, scale * sumlx, best)
    L[zero] = 0
    return np.where(zero, F(0), scale).astype(F), L


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [nb, 256] -> Q6_K blocks [nb, 210]."""
    nb = x.shape[0]
    scales, L = make_qx_quants(x.reshape(nb * 16, 16))
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale, max_abs = np.zeros(nb, F), np.zeros(nb, F)
    for ib in range(16):
        a = np.abs(scales[:, ib])
        upd = a > max_abs
        max_abs, max_scale = np.where(upd, a, max_abs), np.where(upd, scales[:, ib], max_scale)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F(-128) / max_scale
        d16 = _f16(F(1) / iscale)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        d = d16.astype(F)[:, None] * sc.astype(F)
        lq = np.clip(nearest_int(x.reshape(nb, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], lq, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]
    lo = L & 0x0F
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], 2)
    qh = (L[:, :, 0] >> 4) | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    d_bytes = d16.reshape(nb, 1).view(np.uint8)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d_bytes], 1)
    out[zero] = 0
    return out


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 [..., k*256] -> "q4_k" / "q5_k" / "q6_k" bytes uint8 [..., k * block bytes]."""
    flat = np.ascontiguousarray(x, dtype=F).reshape(-1, QK_K)
    out = _quantize_q6_k(flat) if kind == "q6_k" else _quantize_qk(flat, {"q4_k": 15, "q5_k": 31}[kind])
    return out.reshape(*x.shape[:-1], -1)
