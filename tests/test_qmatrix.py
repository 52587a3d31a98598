"""QMatrix: the native gguf layout, packed 4-bit matmul against dequantize-then-matmul, dense types, and the
memory API. The int4pack tests ask for that kernel explicitly (the CPU default is the native gguf layout)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_quant_formats import random_raw

from quant import native, prefill
from quant.errors import LiteError
from quant.formats import dequantize, quantize
from quant.qmatrix import INT4_TYPES, NATIVE_TYPES, QMatrix

Q = gguf.GGMLQuantizationType
U = 2.0**-8  # bf16 keeps 8 significant bits: one rounding to bf16 has relative error <= 2^-8 (unit roundoff)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_native = pytest.mark.usefixtures("native_kernels")  # builds on first use, skips with the reason if it cannot


def scale_zero_magnitudes(raw: np.ndarray, qtype: Q, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """|scale| and |zero| of each 32-group in torch's w = (q - 8) * scale + zero form, from gguf's own unpacking,
    expanded to [n, k]: they size the error the bf16 rounding of (scale, zero) can cause."""
    if qtype == Q.Q4_K:
        b = raw.reshape(-1, 144)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        s, z = d * sc, 8 * d * sc - dmin * m
    else:
        b = raw.reshape(-1, 18 if qtype == Q.Q4_0 else 20)
        s = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        z = np.zeros_like(s) if qtype == Q.Q4_0 else b[:, 2:4].copy().view(np.float16).astype(np.float32) + 8 * s
    expand = lambda a: np.repeat(np.abs(a).reshape(n, k // 32), 32, axis=1)  # noqa: E731
    return expand(s), expand(z)


def make_raw(qtype: Q, n: int, k: int, seed: int, quantized: bool) -> np.ndarray:
    """Either random block bytes, or real weights quantized (Q4_1 through gguf, which can write it)."""
    rng = np.random.default_rng(seed)
    if not quantized:
        return random_raw(qtype, (n, k), rng)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(w, qtype) if qtype == Q.Q4_1 else quantize(w, qtype)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("quantized", [False, True], ids=["random-blocks", "quantized-weights"])
@pytest.mark.parametrize("n,k", [(48, 256), (40, 512)])  # 40: out_features not a multiple of 16 (padded)
@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda t: t.name)
def test_int4_matmul_matches_dequantize_then_matmul(qtype: Q, n: int, k: int, quantized: bool) -> None:
    raw = make_raw(qtype, n, k, seed=n + k + int(qtype), quantized=quantized)
    qm = QMatrix.from_gguf(raw, qtype, (n, k), kernel="int4pack")
    assert qm.layout == "cpu" and qm.dtype == torch.bfloat16
    w = dequantize(raw, qtype, (n, k)).double()  # [n, k], exact
    s, z = (torch.from_numpy(a).double() for a in scale_zero_magnitudes(raw, qtype, n, k))

    # The stored weight differs from the exact one only by the bf16 rounding of (scale, zero):
    # |dw| <= U (|q - 8| |scale| + |zero|) <= U (8 |scale| + |zero|). A wrong mapping is off by O(|w|).
    dw = (qm.dequantize().double() - w).abs()
    assert torch.all(dw <= 1.001 * U * (8 * s + z))  # 1.001: float32 rounding of the products

    # The kernel rounds x to bf16, may round each dequantized weight to bf16 too, accumulates in float32 and rounds
    # y to bf16: |y - x @ w.T| <= U |x| @ (2 |w| + 8 |scale| + |zero|).T + U |y|, elementwise, to first order
    # (the factor 1.01 covers the second-order terms and the float32 accumulation).
    torch.manual_seed(0)
    for x in (torch.randn(1, k), torch.randn(16, k), torch.randn(2, 3, k), torch.randn(5, k).bfloat16()):
        y = qm(x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
        xd = x.double()
        ref = xd @ w.T
        bound = 1.01 * U * (xd.abs() @ (2 * w.abs() + 8 * s + z).T + ref.abs())
        assert torch.all((y.double() - ref).abs() <= bound)
        # and the error is small in aggregate (not just within a loose elementwise bound)
        assert (y.double() - ref).norm() <= 0.01 * ref.norm()


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name
)  # fmt: skip
def test_other_types_are_dequantized_once_and_exact_in_float32(qtype: Q) -> None:
    raw = random_raw(qtype, (32, 256), np.random.default_rng(int(qtype)))
    qm = QMatrix.from_gguf(raw, qtype, (32, 256), kernel="int4pack")  # no int4 packing for these: dense
    w = dequantize(raw, qtype, (32, 256))
    assert qm.layout == "dense" and qm.dtype == torch.float32 and qm.nbytes == 32 * 256 * 4
    assert torch.equal(qm.dequantize(), w)
    x = torch.randn(7, 256)
    torch.testing.assert_close(qm(x), x @ w.T, rtol=1e-6, atol=1e-6)
    qb = QMatrix.from_gguf(raw, qtype, (32, 256), dtype=torch.bfloat16, kernel="dense")
    assert qb.dtype == torch.bfloat16 and qb(x).dtype == torch.float32 and qb.nbytes == 32 * 256 * 2


def test_int4_stays_packed() -> None:
    n, k = 1408, 2048
    raw = make_raw(Q.Q4_K, n, k, seed=1, quantized=False)
    qm = QMatrix.from_gguf(raw, Q.Q4_K, (n, k), kernel="int4pack")
    # 4 bits per weight plus a bf16 (scale, zero) pair per 32 weights: 5 bits per weight
    assert qm.nbytes == n * k // 2 + (k // 32) * n * 2 * 2
    assert qm.nbytes * 8 / (n * k) == 5.0


def test_float_weights_and_cat() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(16, 64), torch.randn(32, 64)
    x = torch.randn(3, 64)
    dense = QMatrix.cat([QMatrix.from_float(a), QMatrix.from_float(b)])
    torch.testing.assert_close(dense(x), x @ torch.cat([a, b]).T)
    # fused gate+up: one packed matrix whose halves equal the separate products bit for bit
    ra, rb = make_raw(Q.Q4_K, 48, 256, 2, True), make_raw(Q.Q4_0, 40, 256, 3, True)
    qa, qb = (QMatrix.from_gguf(r, t, (n, 256), kernel="int4pack") for r, t, n in ((ra, Q.Q4_K, 48), (rb, Q.Q4_0, 40)))
    fused = QMatrix.cat([qa, qb])
    x = torch.randn(4, 256)
    y = fused(x)
    assert fused.shape == (88, 256)
    assert torch.equal(y[:, :48], qa(x)) and torch.equal(y[:, 48:], qb(x))
    assert torch.equal(fused.dequantize(), torch.cat([qa.dequantize(), qb.dequantize()]))
    # whole 64-row blocks join as packed bytes (no repacking); same results
    rc, rd = make_raw(Q.Q4_K, 128, 512, 4, True), make_raw(Q.Q4_K, 64, 512, 5, True)
    qc, qd = (QMatrix.from_gguf(r, Q.Q4_K, (n, 512), kernel="int4pack") for r, n in ((rc, 128), (rd, 64)))
    fused = QMatrix.cat([qc, qd])
    x = torch.randn(2, 512).bfloat16()
    y = fused(x)
    assert torch.equal(y[:, :128], qc(x)) and torch.equal(y[:, 128:], qd(x))
    assert torch.equal(fused.dequantize(), torch.cat([qc.dequantize(), qd.dequantize()]))


@pytest.mark.parametrize("kernel", ["native", "int4pack"])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_cache_slot_api(qtype: Q, kernel: str) -> None:
    raw = (
        make_raw(Q.Q4_K, 64, 256, 4, True)
        if qtype == Q.Q4_K
        else random_raw(qtype, (64, 256), np.random.default_rng(4))
    )
    src = QMatrix.from_gguf(raw, qtype, (64, 256), kernel=kernel)
    x = torch.randn(2, 256)
    slot = src.empty_like("cpu")
    assert slot.nbytes == src.nbytes and slot.layout == src.layout
    assert slot.copy_(src) is slot
    assert torch.equal(slot(x), src(x))
    moved = src.to("cpu")
    assert torch.equal(moved(x), src(x))
    other = QMatrix.from_gguf(make_raw(Q.Q4_K, 32, 256, 5, True), Q.Q4_K, (32, 256), kernel=kernel)
    with pytest.raises(ValueError, match="cannot copy"):
        slot.copy_(other)


def test_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match="2-D"):
        QMatrix.from_gguf(np.zeros(18 * 4, dtype=np.uint8), Q.Q4_0, (2, 2, 32))


# ---- the native gguf layout (CPU) ----------------------------------------------------------------------------


def native_raw(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    return (
        make_raw(qtype, n, k, seed, quantized=True)
        if qtype in (Q.Q4_0, Q.Q4_K)
        else random_raw(qtype, (n, k), np.random.default_rng(seed))
    )


@needs_native
@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_gguf_layout_is_zero_copy_and_runs_the_native_kernel(qtype: Q, tmp_path) -> None:
    n, k = 48, 512
    raw = native_raw(qtype, n, k, seed=int(qtype))
    raw.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode="r")  # as GGUFFile gives tensor bytes
    qm = QMatrix.from_gguf(mapped, qtype, (n, k))
    assert qm.layout == "gguf" and qm.readonly and qm.dtype == torch.float32
    assert qm.tensors["raw"].data_ptr() == mapped.ctypes.data and qm.nbytes == raw.nbytes  # no copy, GGUF size
    w = dequantize(raw, qtype, (n, k))
    assert torch.equal(qm.dequantize(), w)
    torch.manual_seed(int(qtype))
    for x in (torch.randn(1, k), torch.randn(2, 3, k), torch.randn(5, k).bfloat16()):
        y = qm(x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
        expected = native.gguf_matmul(x.float(), raw, int(qtype), n, k).to(x.dtype)  # the same kernel, bit for bit
        assert torch.equal(y, expected)
        ref = x.double() @ w.double().T  # 8-bit activations: close to the float product, not a wrong mapping
        assert (y.double() - ref).norm() <= 0.02 * ref.norm()
    with pytest.raises(ValueError, match="read-only"):
        qm.copy_(QMatrix.from_gguf(raw, qtype, (n, k)))


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_gguf_large_batches_use_a_bf16_gemm(qtype: Q, monkeypatch) -> None:
    monkeypatch.setenv("LITE_PREFILL_GEMM", "bf16")
    n, k = 40, 256
    raw = native_raw(qtype, n, k, seed=7)
    qm = QMatrix.from_gguf(raw, qtype, (n, k))
    w = dequantize(raw, qtype, (n, k)).double()
    x = torch.randn(prefill.from_rows(qtype, (n, k)), k, generator=torch.Generator().manual_seed(3))
    y, ref = qm(x).double(), x.double() @ w.T
    # x and the dequantized w are each rounded to bf16 and y is rounded to bf16; float32 accumulation
    bound = 1.01 * U * (2 * x.double().abs() @ w.abs().T + ref.abs())
    assert torch.all((y - ref).abs() <= bound)
    assert torch.equal(qm(x[:-1]), native.gguf_matmul(x[:-1], raw, int(qtype), n, k))  # one row fewer: native


@needs_native
def test_gguf_cat_joins_rows_and_other_layouts_are_kept() -> None:
    ra, rb = native_raw(Q.Q8_0, 48, 256, 1), native_raw(Q.Q8_0, 40, 256, 2)
    qa, qb = QMatrix.from_gguf(ra, Q.Q8_0, (48, 256)), QMatrix.from_gguf(rb, Q.Q8_0, (40, 256))
    fused = QMatrix.cat([qa, qb])
    assert fused.layout == "gguf" and fused.shape == (88, 256) and fused.nbytes == qa.nbytes + qb.nbytes
    x = torch.randn(3, 256)
    y = fused(x)
    assert torch.equal(y[:, :48], qa(x)) and torch.equal(y[:, 48:], qb(x))
    with pytest.raises(ValueError, match="one type"):  # lite.weights falls back to a Concat
        QMatrix.cat([qa, QMatrix.from_gguf(native_raw(Q.Q4_0, 32, 256, 3), Q.Q4_0, (32, 256))])
    # Q4_1 has no native kernel: packed for int4 as before; F32 stays dense (an f32 GGUF stays exact)
    assert QMatrix.from_gguf(make_raw(Q.Q4_1, 32, 256, 4, True), Q.Q4_1, (32, 256)).layout == "cpu"
    assert QMatrix.from_gguf(random_raw(Q.F32, (32, 256), np.random.default_rng(5)), Q.F32, (32, 256)).layout == "dense"


@needs_native
def test_cpu_kernel_choice(monkeypatch) -> None:
    raw = native_raw(Q.Q4_K, 32, 256, 6)
    layouts = {}
    for kernel in ("native", "int4pack", "dense"):
        monkeypatch.setenv("LITE_CPU_KERNEL", kernel)
        layouts[kernel] = QMatrix.from_gguf(raw, Q.Q4_K, (32, 256)).layout
    assert layouts == {"native": "gguf", "int4pack": "cpu", "dense": "dense"}
    assert QMatrix.from_gguf(raw, Q.Q4_K, (32, 256), kernel="native").layout == "gguf"  # the argument wins
    monkeypatch.setenv("LITE_CPU_KERNEL", "fast")
    with pytest.raises(LiteError, match="LITE_CPU_KERNEL"):
        QMatrix.from_gguf(raw, Q.Q4_K, (32, 256))


# ---- CUDA (run on a GPU machine) -------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.Q4_1, Q.BF16], ids=lambda t: t.name)
def test_cuda_weights_are_their_gguf_bytes(qtype: Q) -> None:
    """On CUDA a weight is its GGUF bytes on the device (no repack, no bf16 expansion), multiplied by the Triton
    kernels: float32 accumulation of exactly dequantized weights."""
    n, k = 40, 512
    raw = random_raw(qtype, (n, k), np.random.default_rng(9))
    w = dequantize(raw, qtype, (n, k)).double()
    qm = QMatrix.from_gguf(raw, qtype, (n, k), device="cuda", dtype=torch.bfloat16)
    assert qm.layout == "gguf" and qm.device.type == "cuda" and qm.nbytes == raw.nbytes
    assert torch.equal(qm.tensors["raw"].cpu(), torch.from_numpy(np.array(raw)).reshape(-1))
    for x in (torch.randn(1, k), torch.randn(16, k)):
        y = qm(x.cuda()).cpu().double()
        ref = x.double() @ w.T
        assert (y - ref).abs().max() <= 1e-3 * ref.abs().max(), qtype
    back = qm.to("cpu")  # the bytes move as they are, both ways
    assert back.layout == "gguf" and torch.equal(back.tensors["raw"], qm.tensors["raw"].cpu())
    fused = QMatrix.cat([qm, qm])  # gate and up fused on the device: the bytes concatenate
    x = torch.randn(2, k, device="cuda").bfloat16()
    assert torch.equal(fused(x), torch.cat([qm(x), qm(x)], dim=-1))


def test_bf16_gemm_rows_are_bucketed():
    """oneDNN caches a primitive (~0.6 MiB) per GEMM shape: the rows of a bf16 GEMM are padded to 8 sizes per
    octave, so a chat's prefill chunks (96..128 rows) meet 5 shapes instead of 33 (RSS grew 100 MiB before)."""
    from quant.prefill import bucket_rows
    from quant.prefill import linear as _linear

    assert [bucket_rows(m) for m in (1, 15, 16, 17, 97, 100, 128, 129, 1000)] == [
        1,
        15,
        16,
        18,
        104,
        104,
        128,
        144,
        1024,
    ]
    assert all(m <= bucket_rows(m) <= m * 1.125 for m in range(1, 9000))
    assert len({bucket_rows(m) for m in range(96, 129)}) == 5
    w = torch.randn(48, 64).to(torch.bfloat16)
    x = torch.randn(100, 64).to(torch.bfloat16)
    y = _linear(x, w)
    assert y.shape == (100, 48)
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)


@needs_native
def test_every_native_type_has_a_dequantize_threshold() -> None:
    assert set(NATIVE_TYPES) == set(prefill.FROM_ROWS) == set(prefill.INT8_FROM_ROWS)
