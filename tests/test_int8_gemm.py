"""The int8 prefill GEMM (quant/csrc/int8_gemm.cpp via quant/prefill.py): its 8-bit codes are numpy's rounding of
the activations and of the weight's decoded values, per 128 values; its product is the exact sum of those codes'
products (float64 reference); and prefill picks it, or the bf16 GEMM, as LITE_PREFILL_GEMM and the type say."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_quant_formats import gguf_dequantize, random_raw

from quant import prefill
from quant.errors import LiteError

Q = gguf.GGMLQuantizationType
CHUNK, MR = 128, 8  # int8_gemm.cpp's scale block along K and its tile of activation rows
TYPES = [Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q4_0, Q.Q8_0, Q.Q5_K, Q.Q5_1, Q.IQ4_NL, Q.IQ4_XS, Q.Q2_K, Q.Q3_K]


@pytest.fixture
def vnni(native_kernels):
    if native_kernels.best_isa() != "avx512":
        pytest.skip("the int8 GEMM needs AVX512-VNNI")
    return native_kernels


def codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (int codes [M, K], scales float32 [M, chunks]): symmetric, absmax / 127 per chunk."""
    m, k = x.shape
    q, s = np.zeros((m, k), np.int64), np.zeros((m, -(-k // CHUNK)), np.float32)
    for c in range(s.shape[1]):
        block = x[:, c * CHUNK : (c + 1) * CHUNK]
        amax = np.abs(block).max(axis=1).astype(np.float32)
        s[:, c] = amax / np.float32(127)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        q[:, c * CHUNK : (c + 1) * CHUNK] = np.rint((block * inv[:, None]).astype(np.float32))
    return q, s


def reference(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 product in float64, and the sum of its terms' magnitudes (float32 accumulation's scale)."""
    (qx, sx), (qw, sw) = codes(x), codes(w)
    y, mag = np.zeros((x.shape[0], w.shape[0])), np.zeros((x.shape[0], w.shape[0]))
    for c in range(sx.shape[1]):
        dots = qx[:, c * CHUNK : (c + 1) * CHUNK] @ qw[:, c * CHUNK : (c + 1) * CHUNK].T
        term = dots * sx[:, c : c + 1].astype(np.float64) * sw[:, c][None].astype(np.float64)
        y, mag = y + term, mag + np.abs(term)
    return y, mag


def unpack(q: torch.Tensor, m: int) -> np.ndarray:
    """quantize_acts' tile layout [M / 8][K / 4][8][4] (code + 128) -> signed codes [M, K]."""
    k = q.shape[1]
    rows = q.view(-1, k // 4, MR, 4).permute(0, 2, 1, 3).reshape(-1, k)
    return rows[:m].numpy().astype(np.int64) - 128


@pytest.mark.parametrize("k", [64, 192, 512])
def test_activation_codes_are_numpys_rounding(vnni, k: int) -> None:
    rng = np.random.default_rng()
    m = int(rng.integers(1, 30))
    x = (rng.standard_normal((m, k)) * rng.exponential(1.0, (1, k))).astype(np.float32)
    x[0, :CHUNK] = 0  # a chunk of zeros: scale 0, codes 0
    q, s = prefill.quantize_acts(torch.from_numpy(x))
    want_q, want_s = codes(x)
    assert q.shape == (-(-m // MR) * MR, k) and s.shape == (m, -(-k // CHUNK))
    assert np.array_equal(unpack(q, m), want_q)
    assert np.array_equal(s.numpy(), want_s)
    assert (q.view(-1, k // 4, MR, 4).permute(0, 2, 1, 3).reshape(-1, k)[m:] == 128).all()  # padding rows: zero


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_int8_linear_is_the_exact_product_of_the_codes(vnni, qtype: Q) -> None:
    """Every panel width (16, 32, 48 rows), tails of the 8-row tiles, a short last chunk; then within 8-bit
    rounding of the exact product of x and the stored weight."""
    rng = np.random.default_rng()
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    m, n = int(rng.integers(1, 40)), int(rng.choice([16, 32, 48, 80, 112]))
    k = int(rng.choice([256, 512, 768])) if bs == 256 else int(rng.choice([192, 320, 512]))
    raw = torch.from_numpy(random_raw(qtype, (n, k), rng).copy())
    w = gguf_dequantize(raw.numpy(), qtype, (n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = prefill.int8_linear(prefill.quantize_acts(torch.from_numpy(x)), raw, qtype, (n, k))
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref, mag = reference(x, w)
    assert np.all(np.abs(y.numpy() - ref) <= 1e-5 * mag + 1e-30)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.linalg.norm(y.numpy() - exact) <= 0.03 * np.linalg.norm(exact)


def test_panel_width_follows_the_threads_and_changes_nothing(vnni) -> None:
    """Many threads and few weight rows take 32- or 16-row panels (work for every thread); the products are summed
    in the same order, so the result is bit-identical."""
    rng = np.random.default_rng()
    n, k, m = 1408, 512, int(rng.integers(9, 60))
    raw = torch.from_numpy(random_raw(Q.Q4_K, (n, k), rng).copy())
    qx = prefill.quantize_acts(torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)))
    before = torch.get_num_threads()
    try:
        ys = []
        for threads in (1, 10, 16):  # 48-, 32- and 16-row panels
            torch.set_num_threads(threads)
            ys.append(prefill.int8_linear(qx, raw, Q.Q4_K, (n, k)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_gemm_choice_follows_the_setting_and_the_type(vnni, monkeypatch) -> None:
    """int8: gguf_linear is the int8 GEMM (bit for bit), except for Q8_0 and shapes its tiles do not fit; bf16:
    the expanded bf16 GEMM; anything else is refused with the variable's name."""
    rng = np.random.default_rng()
    n, k, m = 48, 512, 40
    raw = torch.from_numpy(random_raw(Q.Q4_K, (n, k), rng).copy())
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    monkeypatch.setenv("LITE_PREFILL_GEMM", "int8")
    int8 = prefill.int8_linear(prefill.quantize_acts(x), raw, Q.Q4_K, (n, k))
    assert torch.equal(prefill.gguf_linear(x, raw, Q.Q4_K, (n, k)), int8)
    assert prefill.from_rows(Q.Q4_K, (n, k)) == prefill.INT8_FROM_ROWS[Q.Q4_K]
    assert prefill.from_rows(Q.Q4_K, (40, k)) == prefill.FROM_ROWS[Q.Q4_K]  # 40 rows: not whole 16-row vectors
    assert prefill.from_rows(Q.Q8_0, (n, k)) == prefill.FROM_ROWS[Q.Q8_0]
    assert prefill.swiglu_from_rows(Q.Q4_K, (n, k)) == prefill.INT8_SWIGLU_FROM_ROWS
    monkeypatch.setenv("LITE_PREFILL_GEMM", "bf16")
    bf16 = prefill.gguf_linear(x, raw, Q.Q4_K, (n, k))
    w = torch.from_numpy(gguf_dequantize(raw.numpy(), Q.Q4_K, (n, k)).astype(np.float32))
    assert torch.equal(bf16, F.linear(x.bfloat16(), w.bfloat16()).float())
    assert prefill.swiglu_from_rows(Q.Q4_K, (n, k)) == prefill.SWIGLU_FROM_ROWS
    monkeypatch.setenv("LITE_PREFILL_GEMM", "fp8")
    with pytest.raises(LiteError, match="LITE_PREFILL_GEMM"):
        prefill.gguf_linear(x, raw, Q.Q4_K, (n, k))


def test_expert_on_the_int8_gemm(vnni, monkeypatch) -> None:
    """swiglu with int8: x quantized once for gate and up, the SwiGLU in float32, then down (Q8_0: bf16)."""
    monkeypatch.setenv("LITE_PREFILL_GEMM", "int8")
    rng = np.random.default_rng()
    hidden, inter, m = 256, 128, 24
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    for down in (Q.Q5_0, Q.Q8_0):
        types = (Q.Q4_K, Q.Q4_K, down)
        raws = [torch.from_numpy(random_raw(t, s, rng).copy()) for t, s in zip(types, shapes)]
        ws = [(r, t, s) for r, t, s in zip(raws, types, shapes)]
        x = torch.from_numpy(rng.standard_normal((m, hidden)).astype(np.float32))
        qx = prefill.quantize_acts(x)
        h = F.silu(prefill.int8_linear(qx, *ws[0])) * prefill.int8_linear(qx, *ws[1])
        assert torch.equal(prefill.swiglu(x, *ws), prefill.gguf_linear(h, *ws[2]))


def test_the_default_is_measured(vnni, monkeypatch) -> None:
    """Unset, LITE_PREFILL_GEMM is int8 only where it measures INT8_MIN_SPEEDUP faster than bf16 (once a process)."""
    monkeypatch.delenv("LITE_PREFILL_GEMM", raising=False)
    try:
        for speedup, want in ((1e6, "bf16"), (0.0, "int8")):
            prefill._auto_kind.cache_clear()
            monkeypatch.setattr(prefill, "INT8_MIN_SPEEDUP", speedup)
            assert prefill.gemm_kind() == want
    finally:
        prefill._auto_kind.cache_clear()
