"""Native GGUF block kernels (quant/native.py) against numpy re-implementations of llama.cpp's math.

Weights are random GGUF blocks (random bytes, with the fp16 scale fields overwritten by sane random values,
so every quant/scale bit pattern occurs). Activations are random floats. Each ISA path is checked.
"""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch

from quant import native

# Without a C++ compiler the runtime falls back to torch; with one, a failed build is a bug.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: native kernels can't build")


def test_extension_builds() -> None:
    assert native.available(), native.build_error()


T = gguf.GGMLQuantizationType
# byte offsets of the fp16 scale fields inside one block
SCALE_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208], T.Q5_1: [0, 2], T.IQ4_NL: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q5_K: [0, 2], T.IQ4_XS: [0],
}  # fmt: skip
# types whose value is d * q + min: (the scale field, the min field); the kernels sum the two parts separately
MIN_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q2_K: (80, 82), T.Q5_1: (0, 2)}
Q8_K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)
NEW_TYPES = [T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q5_K, T.IQ4_XS]
ISAS = ["scalar", "avx2", "avx512"]


def isas_here() -> list[str]:
    best = native.ISAS[native.best_isa()]
    return [i for i in ISAS if native.ISAS[i] <= best]


def random_blocks(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, row_bytes] uint8 of random blocks with fp16 scales ~ U(1e-3, 2e-2) (both signs for Q8_0/Q4_0)."""
    bs, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // bs, nbytes), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        d = rng.uniform(1e-3, 2e-2, size=(n, k // bs)).astype(np.float16)
        if qtype not in MIN_FIELDS:  # mins: positive d and dmin, as the quantizers write them
            d *= rng.choice(np.array([-1, 1], np.float16), size=d.shape)
        raw[:, :, off : off + 2] = d[..., None].view(np.uint8)
    return raw.reshape(n, -1)


# --- numpy versions of llama.cpp's quantize_row_q8_0_ref / quantize_row_q8_K_ref ---------------------------


def ref_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x[M, K] float32 -> (qs int8 [M, K], d float32 [M, K/32]) with d = fp16(amax/127), q = roundf(x/d)."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = (xb * inv[..., None]).astype(np.float64)  # the float32 product, then exact rounding below
    q = np.trunc(v) + np.sign(v) * (np.abs(v - np.trunc(v)) >= 0.5)  # roundf: ties away from zero
    return q.astype(np.int8).reshape(x.shape), d.astype(np.float16).astype(np.float32)


def ref_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x[M, K] -> (qs, d float32 [M, K/256]): the first value of largest |x| maps to -127, ties to even."""
    xb = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(xb).argmax(-1)  # first occurrence, as the reference's strict `>`
    mx = np.take_along_axis(xb, idx[..., None], -1)[..., 0]
    safe = np.where(mx != 0, mx, np.float32(1))
    iscale = (np.float32(-127) / safe).astype(np.float32)
    q = np.minimum(np.rint(xb * iscale[..., None]), 127)  # float32 product, round half to even
    q = np.where(mx[..., None] != 0, q, 0)
    d = np.where(mx != 0, np.float32(1) / iscale, 0).astype(np.float32)
    return q.astype(np.int8).reshape(x.shape), d


def random_x(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :256] = 0  # an all-zero block
    if m > 1 and k >= 512:  # exact ties: scale 1 makes x * id land on k + 0.5
        x[1, 256:512] = (np.arange(256) % 200 - 100 + 0.5).astype(np.float32)
        x[1, 256 + 31] = 127.0  # Q8_0 block with amax 127 -> id = 1
        x[1, 256 + 255] = -127.0  # Q8_K: max -127 -> iscale = 1
    return x


@pytest.mark.parametrize("q8_k", [False, True], ids=["q8_0", "q8_K"])
def test_activation_quantizer_matches_reference(q8_k: bool) -> None:
    rng = np.random.default_rng(1)
    x = random_x(5, 1024, rng)
    qs, d, sums = native.quantize_acts(torch.from_numpy(x), q8_k)
    rq, rd = (ref_q8_k if q8_k else ref_q8_0)(x)
    np.testing.assert_array_equal(qs.numpy(), rq)
    np.testing.assert_array_equal(d.numpy(), rd)
    group = 16 if q8_k else 32
    np.testing.assert_array_equal(sums.numpy(), rq.reshape(5, -1, group).astype(np.int32).sum(-1))


def test_fp16_rounding_of_q8_0_scale() -> None:
    # amax/127 at fp16 halfway points and subnormals must round to even, as numpy's float16 does
    rng = np.random.default_rng(2)
    amax = np.concatenate([rng.uniform(1e-6, 1e-3, 500), rng.uniform(1e-3, 100.0, 500)]).astype(np.float32)
    x = np.zeros((1000, 32), np.float32)
    x[:, 7] = amax
    _, d, _ = native.quantize_acts(torch.from_numpy(x), False)
    np.testing.assert_array_equal(d.numpy()[:, 0], (amax / np.float32(127)).astype(np.float16).astype(np.float32))


def k_for(qtype: T) -> int:
    return 2048 if qtype in Q8_K_TYPES else 1408


def dequantized_acts(x: np.ndarray, qtype: T) -> np.ndarray:
    """What the kernel multiplies: the 8-bit activations times their block scales, in float64 (exact)."""
    if qtype in Q8_K_TYPES:
        q, d = ref_q8_k(x)
        bs = 256
    else:
        q, d = ref_q8_0(x)
        bs = 32
    return (q.astype(np.float64).reshape(x.shape[0], -1, bs) * d[..., None]).reshape(x.shape)


def part(raw: np.ndarray, qtype: T, zero_field: int) -> np.ndarray:
    """A type with mins dequantized with its scale or its min field zeroed: the other part alone."""
    r = raw.copy().reshape(raw.shape[0], -1, gguf.GGML_QUANT_SIZES[qtype][1])
    r[:, :, zero_field : zero_field + 2] = 0
    return gguf.quants.dequantize(r.reshape(raw.shape), qtype).astype(np.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K, *NEW_TYPES], ids=lambda t: t.name)
@pytest.mark.parametrize("m,n", [(1, 37), (7, 50), (16, 16), (9, 5)])
def test_matmul_equals_quantized_math(qtype: T, m: int, n: int, isa: str) -> None:
    if isa not in isas_here():
        pytest.skip(f"CPU lacks {isa}")
    k = k_for(qtype)
    rng = np.random.default_rng([int(qtype), m, n])
    raw = random_blocks(qtype, n, k, rng)
    x = random_x(m, k, rng)
    y = native.gguf_matmul(torch.from_numpy(x), raw, int(qtype), n, k, isa=isa).numpy()
    assert y.shape == (m, n) and y.dtype == np.float32

    # Exact math: gguf's dequantized W (each value exact or within 1 float32 ulp) times the exactly
    # dequantized 8-bit activations, summed in float64. The kernel differs only by float32 rounding of the
    # per-block scale products and of the accumulation over <= 64 blocks: relative to the sum of |terms|,
    # that is a few 1e-7; 1e-5 leaves margin. (For types with mins, |terms| include the mins.)
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    xa = dequantized_acts(x, qtype)
    exact = xa @ w.T
    scale = np.abs(xa) @ np.abs(w).T
    if qtype in MIN_FIELDS:  # the kernel sums d*sc*q and dmin*m separately: bound by both parts' magnitudes
        d_field, m_field = MIN_FIELDS[qtype]
        scale = np.abs(xa) @ (np.abs(part(raw, qtype, d_field)) + np.abs(part(raw, qtype, m_field))).T
    assert np.all(np.abs(y - exact) <= 1e-5 * scale + 1e-30), np.max(np.abs(y - exact) / scale)

    # Against the float product: quantizing x moves each value by at most half a step, amax/254 per block,
    # so |y - x @ W.T| <= |W| @ (amax_block / 254), plus float rounding.
    bs = 256 if qtype in Q8_K_TYPES else 32
    half_step = np.repeat(np.abs(x).reshape(m, -1, bs).max(-1) / 254.0, bs, axis=1)
    bound = half_step @ np.abs(w).T
    err = np.abs(y - x.astype(np.float64) @ w.T)
    assert np.all(err <= bound * 1.001 + 1e-5 * scale), np.max(err / bound)


def test_paths_agree_on_prefill_sized_input() -> None:
    rng = np.random.default_rng(3)
    for qtype in (T.Q4_K, T.Q4_0):
        k = k_for(qtype)
        raw = torch.from_numpy(random_blocks(qtype, 24, k, rng))
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(0))
        ys = [native.gguf_matmul(x, raw, int(qtype), 24, k, isa=i) for i in isas_here()]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-4)


def test_two_threads_equal_one() -> None:
    """Rows are split across torch's intra-op threads; the split must not change any result bit."""
    rng = np.random.default_rng(5)
    before = torch.get_num_threads()
    try:
        for qtype in (T.Q4_K, T.Q8_0):
            k = k_for(qtype)
            raw = torch.from_numpy(random_blocks(qtype, 200, k, rng))
            x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
            torch.set_num_threads(1)
            one = native.gguf_matmul(x, raw, int(qtype), 200, k)
            torch.set_num_threads(2)
            two = native.gguf_matmul(x, raw, int(qtype), 200, k)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(before)


def test_zero_copy_from_read_only_memmap(tmp_path) -> None:
    rng = np.random.default_rng(4)
    raw = random_blocks(T.Q8_0, 300, 1408, rng)  # > 64 KiB: takes the threaded path
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    t = native.as_raw(mm)
    assert t.data_ptr() == mm.ctypes.data  # a view, not a copy
    x = torch.randn(2, 1408)
    y = native.gguf_matmul(x, t, int(T.Q8_0), 300, 1408)
    torch.testing.assert_close(
        y, native.gguf_matmul(x, raw, int(T.Q8_0), 300, 1408, isa="scalar"), rtol=1e-5, atol=1e-4
    )


def test_leading_dims_and_empty() -> None:
    raw = torch.from_numpy(random_blocks(T.Q8_0, 8, 64, np.random.default_rng(6)))
    x = torch.randn(2, 3, 64)
    y = native.gguf_matmul(x, raw, int(T.Q8_0), 8, 64)
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y.reshape(6, 8), native.gguf_matmul(x.reshape(6, 64), raw, int(T.Q8_0), 8, 64))
    assert native.gguf_matmul(torch.zeros(0, 64), raw, int(T.Q8_0), 8, 64).shape == (0, 8)


def test_bad_arguments_raise() -> None:
    raw = np.zeros((4, 34 * 2), np.uint8)
    with pytest.raises(RuntimeError, match="expected"):
        native.gguf_matmul(torch.zeros(1, 64), raw, int(T.Q8_0), 5, 64)
    with pytest.raises(RuntimeError, match="multiple"):
        native.gguf_matmul(torch.zeros(1, 48), raw, int(T.Q8_0), 4, 48)
    with pytest.raises(RuntimeError, match="unsupported"):
        native.gguf_matmul(torch.zeros(1, 64), raw, int(T.Q4_1), 4, 64)
    with pytest.raises(native.LiteError, match="unknown ISA"):
        native.gguf_matmul(torch.zeros(1, 64), raw, int(T.Q8_0), 4, 64, isa="neon")


@pytest.mark.parametrize(
    "types",
    [
        (T.Q4_K, T.Q4_K, T.Q4_0),
        (T.Q8_0, T.Q8_0, T.Q8_0),
        (T.Q4_K, T.Q8_0, T.Q6_K),
        (T.Q2_K, T.Q2_K, T.Q3_K),
        (T.IQ4_XS, T.IQ4_XS, T.IQ4_NL),
        (T.Q5_K, T.Q5_1, T.Q5_K),
    ],
    ids=["q4k-q4_0", "q8_0", "mixed", "q2k-q3k", "iq4", "q5"],
)
def test_moe_ffn_equals_chained_matmuls(types: tuple[T, T, T]) -> None:
    hidden, inter, k = 512, 256, 3
    rng = np.random.default_rng(5)
    g, u, d = types
    gate = [torch.from_numpy(random_blocks(g, inter, hidden, rng)).reshape(-1) for _ in range(k)]
    up = [torch.from_numpy(random_blocks(u, inter, hidden, rng)).reshape(-1) for _ in range(k)]
    down = [torch.from_numpy(random_blocks(d, hidden, inter, rng)).reshape(-1) for _ in range(k)]
    x = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    w = torch.rand(k)
    y = native.moe_ffn(x, gate, up, down, w, (int(g), int(u), int(d)), inter)

    ref = torch.zeros(hidden)
    for e in range(k):
        h = native.gguf_matmul(x[None], gate[e], int(g), inter, hidden)
        h = h / (1 + torch.exp(-h)) * native.gguf_matmul(x[None], up[e], int(u), inter, hidden)
        ref += w[e] * native.gguf_matmul(h, down[e], int(d), hidden, inter)[0]
    # Same kernels, quantizers and summation order: equal here; the tolerance only covers a libm exp that
    # differs from torch's by an ulp and flips one of h's 8-bit codes.
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-3 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="bytes"):
        native.moe_ffn(x, gate, up, down[:2] + [down[2][:-1]], w, (int(g), int(u), int(d)), inter)


# fp16 fields of every type in the extension's type table (byte offsets inside one block)
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0], T.Q2_K: [80, 82],
    T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_XS: [0],
}  # fmt: skip


def test_type_table_matches_gguf_sizes_and_lists() -> None:
    table = native.type_table()
    assert set(T[name] for name in table) == set(F16_FIELDS)
    for name, info in table.items():
        assert (info.block, info.bytes) == gguf.GGML_QUANT_SIZES[T[name]]
        assert info.q8_k == (info.block == 256)
    assert native.SUPPORTED_QTYPES == {k: t.qtype for k, t in table.items() if t.matmul}
    assert native.QUANTIZE_QTYPES == {k: t.qtype for k, t in table.items() if t.quantize}
    assert {"Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= set(native.SUPPORTED_QTYPES)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_table_dequantizers_equal_gguf_bit_for_bit(qtype: T) -> None:
    """The C++ block decoders (which the generic kernels also use) against gguf-py, on random blocks."""
    rng = np.random.default_rng(int(qtype))
    bs, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(300, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.uniform(-2, 2, size=(300, 1)).astype(np.float16)
        d[:5] = 0  # zero scales: signed zeros must match too
        raw[:, off : off + 2] = d.view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = native.dequantize(raw.reshape(-1), int(qtype)).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
