"""CPU prefill at matrix speed (quant/prefill.py): the native expander is bit-identical to gguf-py's dequantizer,
and the bf16 GEMMs built on it stay within bf16's rounding of the exact product (the int8 GEMM:
tests/test_int8_gemm.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_quant_formats import gguf_dequantize, random_raw

from offload.experts import ExpertWeights
from quant import native, prefill
from quant.formats import FLOAT_TYPES, READ_TYPES
from quant.qmatrix import QMatrix

Q = gguf.GGMLQuantizationType
U = 2.0**-8  # unit roundoff of bf16
needs_native = pytest.mark.usefixtures("native_kernels")  # builds on first use, skips with the reason if it cannot
EXPAND_TYPES = [t for t in READ_TYPES if t not in FLOAT_TYPES]  # every block type lite reads


def _blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(random_raw(qtype, (n, k), rng).copy())


@needs_native
@pytest.mark.parametrize("qtype", EXPAND_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", ["best", "scalar"])
def test_native_expand_is_bit_identical_to_gguf(qtype: Q, isa: str, monkeypatch) -> None:
    rng = np.random.default_rng()
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    n, k = int(rng.integers(1, 40)), bs * int(rng.integers(1, 9))  # odd row counts: uneven thread splits
    raw = _blocks(qtype, n, k, rng)
    want = torch.from_numpy(gguf_dequantize(raw.numpy(), qtype, (n, k)).astype(np.float32))
    if isa == "scalar":  # the portable loops instead of the AVX-512 forms
        monkeypatch.setenv("LITE_NATIVE_ISA", "scalar")
    got = native.dequantize(raw, int(qtype), n, k, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    got16 = native.dequantize(raw, int(qtype), n, k, torch.bfloat16)
    assert torch.equal(got16.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))  # torch's RNE


@needs_native
def test_native_expand_writes_into_a_slice_and_keeps_nan() -> None:
    rng = np.random.default_rng()
    raw = _blocks(Q.Q8_0, 8, 64, rng)
    raw.view(-1, 34)[3, 0:2] = torch.tensor([0x7E00], dtype=torch.int16).view(torch.uint8)  # fp16 NaN scale
    buf = torch.full((16, 64), 7.0, dtype=torch.bfloat16)
    native.dequantize(raw, int(Q.Q8_0), 8, 64, out=buf[8:])
    want = torch.from_numpy(gguf_dequantize(raw.numpy(), Q.Q8_0, (8, 64)).astype(np.float32))
    assert torch.equal(buf[:8], torch.full((8, 64), 7.0, dtype=torch.bfloat16))
    assert torch.equal(buf[8:].float().isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(buf[8:].nan_to_num(), want.to(torch.bfloat16).nan_to_num())
    with pytest.raises(RuntimeError, match="bytes"):
        native.dequantize(raw[:-1], int(Q.Q8_0), 8, 64)


def _within_bf16(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, roundings: int) -> bool:
    """|y - x w^T| within `roundings` bf16 roundings of the terms (float32 accumulation)."""
    ref = x.double() @ w.double().T
    bound = 1.01 * U * (roundings * x.double().abs() @ w.double().abs().T + ref.abs())
    return bool(torch.all((y.double() - ref).abs() <= bound))


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K, Q.Q4_0, Q.Q5_K], ids=lambda t: t.name)
def test_gguf_linear_is_a_bf16_gemm_of_the_exact_weight(qtype: Q, monkeypatch) -> None:
    monkeypatch.setenv("LITE_PREFILL_GEMM", "bf16")  # the int8 GEMM: tests/test_int8_gemm.py
    rng = np.random.default_rng()
    n, k, m = 48, 512, int(rng.integers(16, 80))
    raw = _blocks(qtype, n, k, rng)
    w = torch.from_numpy(gguf_dequantize(raw.numpy(), qtype, (n, k)).astype(np.float32))
    x = torch.randn(m, k)
    y = prefill.gguf_linear(x, raw, qtype, (n, k))
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert _within_bf16(y, x, w, roundings=2)  # x and w each rounded once; y rounded once (the ref.abs() term)


@needs_native
def test_expert_prefill_is_the_swiglu_of_the_exact_weights(monkeypatch) -> None:
    """An expert called with many rows takes the fused bf16 path; with few, the 8-bit kernels: both compute
    down(silu(gate x) * up x) of the stored weights, within their rounding."""
    monkeypatch.setenv("LITE_PREFILL_GEMM", "bf16")  # the int8 GEMM: tests/test_int8_gemm.py
    rng = np.random.default_rng()
    hidden, inter = 512, 256
    types = (Q.Q4_K, Q.Q4_K, Q.Q8_0)
    # quantized weights of a trained model's scale (random fp16 scales make activations that overflow the
    # 8-bit path's fp16 block scales, in llama.cpp too)
    raws = [
        native.quantize(torch.randn(s) * 0.05, int(t)).reshape(-1)
        for t, s in zip(types, [(inter, hidden), (inter, hidden), (hidden, inter)])
    ]
    mats = [QMatrix.from_gguf(r, t, s) for r, t, s in zip(raws, types, [(inter, hidden)] * 2 + [(hidden, inter)])]
    expert = ExpertWeights(*mats)
    dense = [m.dequantize().double() for m in mats]
    m = prefill.SWIGLU_FROM_ROWS + int(rng.integers(0, 40))
    x = torch.randn(m, hidden) * 0.5
    ref = F.linear(F.silu(F.linear(x.double(), dense[0])) * F.linear(x.double(), dense[1]), dense[2])
    y = expert(x)
    assert torch.equal(y, prefill.swiglu(x, *(q.gguf_weight for q in mats)))
    assert ((y.double() - ref).norm() / ref.norm()) < 4 * U  # bf16 inputs to each GEMM: ~U relative
    few = x[: prefill.SWIGLU_FROM_ROWS - 1]
    want_few = mats[2](F.silu(mats[0](few)) * mats[1](few))  # chained 8-bit kernels
    assert torch.equal(expert(few), want_few)
