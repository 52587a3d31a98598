"""The native quantizers: the bytes of gguf-py's numpy quantizers (32-value types) and of llama.cpp's K-quant
reference algorithms (through the numpy oracle `kquant_oracle`), on data with every awkward case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import quant.native as native
from quant.formats import WRITE_TYPES, dequantize, quantize

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
GGUF_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf-py implements these quantizers
K_TYPES = {Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k"}

pytestmark = pytest.mark.usefixtures("native_kernels")  # builds on first use, skips with the reason if it cannot


def awkward(n_blocks: int, seed: int) -> np.ndarray:
    """float32 [n_blocks, 256]: normal data at scales from 1e-8 to 3e4, plus zero, constant, one-signed, sparse,
    few-level, tiny (below fp16's range) and fp16-rounded super-blocks (the last overflow to ±inf at 3e4)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_blocks, 256)).astype(np.float32)
    x *= rng.choice([1e-8, 1e-4, 1e-2, 1.0, 30.0, 3e4], (n_blocks, 1)).astype(np.float32)
    kind = np.arange(n_blocks) % 10
    x[kind == 1] = 0.0
    x[kind == 2] = np.abs(x[kind == 2])
    x[kind == 3] = -np.abs(x[kind == 3])
    x[kind == 4, ::3] = 0.0
    x[kind == 5] = 0.37
    x[kind == 6] = rng.integers(-8, 8, (int((kind == 6).sum()), 256)).astype(np.float32) / 8
    x[kind == 7, :64] = 0.0
    x[kind == 7, 64:96] = 1e-20
    with np.errstate(over="ignore"):
        x[kind == 8] = x[kind == 8].astype(np.float16).astype(np.float32)
    return x


def gguf_quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    return np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_native_equals_gguf_numpy(qtype: Q) -> None:
    x = awkward(400, int(qtype)) + np.float32(0.0)  # -0.0 -> +0.0: see the next test
    with np.errstate(all="ignore"):
        ref = gguf_quantize(x, qtype)
    np.testing.assert_array_equal(native.quantize(torch.from_numpy(x), int(qtype)).numpy(), ref)


def test_signed_zero_blocks_follow_llama_cpp() -> None:
    """A Q4_0 block of zeros whose first value is -0.0: llama.cpp's `max` starts at +0.0 and d = max / -8 is -0.0,
    while gguf-py takes the -0.0 itself (d = +0.0). Both decode to zeros; lite writes llama.cpp's bytes."""
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = -0.0
    assert native.quantize(torch.from_numpy(x), int(Q.Q4_0)).numpy()[0, :2].tobytes() == b"\x00\x80"


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_native_k_quants_equal_the_reference(qtype: Q) -> None:
    from kquant_oracle import quantize as oracle

    x = awkward(300, 10 + int(qtype))
    ours = native.quantize(torch.from_numpy(x), int(qtype)).numpy()
    ref = oracle(x, K_TYPES[qtype])
    assert ours.shape == ref.shape == (300, gguf.GGML_QUANT_SIZES[qtype][1])
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[:5]}"
    # and the bytes decode to values close to the input (a check of the layout, not of the search), where fp16
    # scales can hold the block's range
    y = dequantize(ours.reshape(-1), qtype, x.shape).numpy()
    amax = np.abs(x).max(axis=1, keepdims=True)
    fits = (amax > 1e-3) & (amax < 1e4)
    assert fits.sum() > 100 and np.all((np.abs(y - x) <= 0.1 * amax)[fits[:, 0]])


def test_baseline_build_gives_the_same_bytes() -> None:
    """LITE_NATIVE_ISA=scalar runs the K-quant search in the baseline (non-AVX2) build: same bytes."""
    x = awkward(64, 3)
    code = (
        "import sys, numpy as np, torch, quant.native as n; x = np.load(sys.argv[1]); "
        "sys.stdout.buffer.write(b''.join(n.quantize(torch.from_numpy(x), t).numpy().tobytes() for t in (12, 13, 14)))"
    )
    path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"lite_q_{os.getpid()}.npy"
    np.save(path, x)
    try:
        env = {**os.environ, "LITE_NATIVE_ISA": "scalar", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, check=True)
    finally:
        path.unlink()
    here = b"".join(native.quantize(torch.from_numpy(x), t).numpy().tobytes() for t in (12, 13, 14))
    assert out.stdout == here


def test_threads_do_not_change_the_bytes() -> None:
    x = torch.from_numpy(awkward(256, 5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [native.quantize(x, int(t)) for t in (Q.Q4_K, Q.Q6_K, Q.Q8_0)]
        torch.set_num_threads(4)
        four = [native.quantize(x, int(t)) for t in (Q.Q4_K, Q.Q6_K, Q.Q8_0)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, four))


@pytest.mark.parametrize("qtype", WRITE_TYPES, ids=lambda t: t.name)
def test_formats_quantize_shapes(qtype: Q) -> None:
    """quant.formats.quantize keeps the leading dimensions and writes whole rows, for every writable type."""
    x = awkward(12, 1).reshape(2, 3, 512)
    raw = quantize(x, qtype)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (2, 3, 512 // bs * ts)
    assert np.array_equal(raw.reshape(6, -1), quantize(x.reshape(6, 512), qtype))


def test_refuses_bad_input() -> None:
    with pytest.raises(RuntimeError, match="not whole blocks"):
        native.quantize(torch.zeros(2, 100), int(Q.Q4_K))
    with pytest.raises(RuntimeError, match="cannot quantize"):
        native.quantize(torch.zeros(2, 256), int(Q.Q2_K))


def test_all_finite() -> None:
    x = torch.randn(100_000)
    assert native.all_finite(x) and native.all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77_777] = bad
        assert not native.all_finite(y) and not native.all_finite(y[77_000:])
    assert native.all_finite(torch.tensor([3.4e38, -1e-45]))
