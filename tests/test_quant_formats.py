"""GGUF reading and GGML block formats, checked against the `gguf` package on fresh random data."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quant.formats import (
    READ_TYPES,
    WRITE_TYPES,
    bits_per_weight,
    block_size,
    can_quantize,
    dequantize,
    quantize,
    type_size,
)
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside each block type.
F16_FIELDS = {
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
    Q.Q6_K: [208], Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}  # fmt: skip


def random_raw(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random GGML bytes for a tensor of `shape`: random bits everywhere, finite random fp16 scale fields."""
    n = int(np.prod(shape))
    if qtype == Q.F32:
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal(n).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, (n // block_size(qtype), type_size(qtype)), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = rng.standard_normal((blocks.shape[0], 1)) * rng.choice([1e-3, 1e-2, 1.0], (blocks.shape[0], 1))
        blocks[:, off : off + 2] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def gguf_dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    if qtype in (Q.F32, Q.F16):
        return gguf.quants.dequantize(raw.view(np.float32 if qtype == Q.F32 else np.float16), qtype).reshape(shape)
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", READ_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_gguf(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    shape = (6, 4, 512)  # a small expert stack: (n_expert, out, in)
    raw = random_raw(qtype, shape, rng)
    ref = gguf_dequantize(raw, qtype, shape)
    ours = dequantize(raw, qtype, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    assert np.array_equal(bits(ours.numpy()), bits(ref))
    # a torch uint8 input gives the same result
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()), qtype, shape), ours)


def test_dequantize_checks_the_byte_count() -> None:
    with pytest.raises(ValueError, match="needs"):
        dequantize(np.zeros(10, dtype=np.uint8), Q.Q4_0, (1, 32))


@pytest.mark.parametrize("qtype", [t for t in WRITE_TYPES if t not in (Q.Q4_K, Q.Q5_K, Q.Q6_K)], ids=lambda t: t.name)
def test_quantize_bytes_equal_gguf(qtype: Q) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    x = rng.standard_normal((8, 256)).astype(np.float32) * rng.choice([1e-3, 1.0, 50.0], (8, 1)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 0.25  # a constant block
    ours = quantize(x, qtype)
    ref = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, ref)


def q4_k_subblock_stats(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 32-weight sub-block of Q4_K bytes: the effective scale d*sc and the stored min dmin*m."""
    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    return (d * sc).reshape(-1), (dmin * m).reshape(-1)


def test_q4_k_round_trips_within_its_error_bound() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    x[:4] *= 0.02  # small-magnitude rows
    x[4, :256] = 0.0  # an all-zero super-block
    x[5, :] = np.abs(x[5, :])  # all-positive rows (min clamps to 0)
    raw = quantize(x, Q.Q4_K)
    assert raw.shape == (16, 1024 // 256 * 144)
    y = gguf.quants.dequantize(raw, Q.Q4_K)
    err = np.abs(y - x).reshape(-1, 32)
    scale, _ = q4_k_subblock_stats(raw)
    # Each weight is rounded to the nearest of 16 levels spaced by the stored scale (error <= scale / 2 inside the
    # levels' span). The (scale, min) search only tries spacings between range/16 and range/14, so a weight
    # clipped at either end is off by at most about one more step: bound 1.5 * scale (measured max ~0.95).
    assert np.all(err.max(axis=1) <= 1.5 * scale + 1e-6)
    # on average it is plain rounding: mean error ~ scale / 4
    nz = scale > 0
    assert np.mean(err.mean(axis=1)[nz] / scale[nz]) < 0.3
    assert np.all(y[4, :256] == 0)
    # Q4_K (asymmetric, searched scales) is more accurate than Q4_0 on the same data
    rmse_k = np.sqrt(np.mean((y - x) ** 2))
    rmse_0 = np.sqrt(np.mean((gguf.quants.dequantize(quantize(x, Q.Q4_0), Q.Q4_0) - x) ** 2))
    assert rmse_k < rmse_0


def test_q4_k_requantization_is_idempotent() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    y1 = gguf.quants.dequantize(quantize(x, Q.Q4_K), Q.Q4_K)
    raw2 = quantize(y1, Q.Q4_K)
    y2 = gguf.quants.dequantize(raw2, Q.Q4_K)
    # y1 lies exactly on a Q4_K grid; quantizing it again should find (nearly) the same grid
    same = np.all(y1.reshape(-1, 32) == y2.reshape(-1, 32), axis=1)
    assert same.mean() >= 0.99
    scale, _ = q4_k_subblock_stats(raw2)
    assert np.all(np.abs(y2 - y1).reshape(-1, 32).max(axis=1) <= scale + 1e-6)


def test_bits_per_weight_and_can_quantize() -> None:
    assert bits_per_weight(Q.Q4_K) == 4.5
    assert bits_per_weight(Q.Q4_0) == 4.5
    assert bits_per_weight(Q.Q8_0) == 8.5
    assert bits_per_weight(Q.Q6_K) == 6.5625
    assert bits_per_weight(Q.F16) == 16 and bits_per_weight(Q.F32) == 32
    assert can_quantize((2048, 1408), Q.Q4_0) and not can_quantize((2048, 1408), Q.Q4_K)
    assert can_quantize((1408, 2048), Q.Q4_K) and can_quantize((7, 5), Q.F32) and not can_quantize((4, 48), Q.Q8_0)
    assert can_quantize((256, 256), Q.Q6_K) and not can_quantize((256, 256), Q.Q2_K)  # not writable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", READ_TYPES, ids=lambda t: t.name)
def test_dequantize_on_cuda_matches_cpu(qtype: Q) -> None:
    raw = random_raw(qtype, (4, 512), np.random.default_rng(3))
    cpu = dequantize(raw, qtype, (4, 512))
    gpu = dequantize(torch.from_numpy(raw).cuda(), qtype, (4, 512))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


# ---- GGUF file -------------------------------------------------------------------------------------------------


def write_gguf(path: str, n_tokens: int) -> dict[str, tuple[np.ndarray, Q, np.ndarray]]:
    """A GGUF with every kind of metadata value and tensors of several types; returns name -> (x, qtype, raw)."""
    rng = np.random.default_rng(11)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_uint32("deepseek2.block_count", 3)
    w.add_float32("deepseek2.rope.freq_base", 10000.0)
    w.add_bool("deepseek2.flag", True)
    w.add_string("tokenizer.chat_template", "{{ messages }} é")
    w.add_token_list([f"tok{i}\u0120é" for i in range(n_tokens)])
    w.add_token_scores([float(i) * 0.5 for i in range(n_tokens)])
    w.add_token_types([i % 5 for i in range(n_tokens)])
    w.add_array("test.ints", [1, -2, 3])
    tensors = {}
    for name, qtype, shape in [
        ("norm.weight", Q.F32, (64,)),
        ("blk.0.ffn_gate_exps.weight", Q.Q4_K, (4, 32, 256)),  # (n_expert, out, in)
        ("blk.0.ffn_down_exps.weight", Q.Q4_0, (4, 256, 32)),
        ("token_embd.weight", Q.Q8_0, (48, 64)),
        ("blk.0.attn.weight", Q.F16, (16, 64)),
    ]:
        x = rng.standard_normal(shape).astype(np.float32)
        raw = quantize(x, qtype)
        w.add_tensor(name, raw.view(np.float16) if qtype == Q.F16 else raw.view(np.float32) if qtype == Q.F32 else raw,
                     raw_dtype=qtype)  # fmt: skip
        tensors[name] = (x, qtype, np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> tuple[str, dict[str, tuple[np.ndarray, Q, np.ndarray]]]:
    path = str(tmp_path_factory.mktemp("gguf") / "t.gguf")
    return path, write_gguf(path, 102400)  # a DeepSeek-sized vocabulary: the fast array parser matters here


def test_gguf_metadata_is_plain_python(gguf_path) -> None:
    path, _ = gguf_path
    f = GGUFFile(path)
    m = f.metadata
    assert m["general.architecture"] == "deepseek2" and f.architecture == "deepseek2"
    assert m["deepseek2.block_count"] == 3 and type(m["deepseek2.block_count"]) is int
    assert m["deepseek2.rope.freq_base"] == 10000.0 and type(m["deepseek2.rope.freq_base"]) is float
    assert m["deepseek2.flag"] is True
    assert m["tokenizer.chat_template"] == "{{ messages }} é"
    assert (
        m["tokenizer.ggml.tokens"][:2] == ["tok0\u0120é", "tok1\u0120é"] and len(m["tokenizer.ggml.tokens"]) == 102400
    )
    assert m["tokenizer.ggml.scores"][3] == 1.5 and m["tokenizer.ggml.token_type"][:6] == [0, 1, 2, 3, 4, 0]
    assert m["test.ints"] == [1, -2, 3]


def test_gguf_metadata_agrees_with_the_stock_reader(tmp_path) -> None:
    path = str(tmp_path / "small.gguf")
    write_gguf(path, 300)  # the stock reader takes ~0.1 ms per string, so keep this vocabulary small
    m = GGUFFile(path).metadata
    ref = gguf.GGUFReader(path)
    names = [n for n in ref.fields if not n.startswith("GGUF.")]
    assert sorted(names) == sorted(m)
    for name in names:
        assert m[name] == ref.fields[name].contents(), name


def test_gguf_tensors_are_memory_mapped_views_in_torch_order(gguf_path) -> None:
    path, tensors = gguf_path
    f = GGUFFile(path)
    assert list(f.tensors) == list(tensors)  # file order
    with open(path, "rb") as fh:
        blob = fh.read()
    for name, (x, qtype, raw) in tensors.items():
        t = f.tensors[name]
        assert t.qtype == qtype and t.shape == x.shape and t.nbytes == raw.nbytes
        assert np.array_equal(t.data, raw)
        assert blob[t.offset : t.offset + t.nbytes] == raw.tobytes()
        assert not t.data.flags.owndata  # a view of the mmap, not a copy
        if len(t.shape) == 3:
            full = dequantize(t.data, qtype, t.shape)
            for i in range(t.shape[0]):
                expert = dequantize(t.slice_bytes(i), qtype, t.shape[1:])
                assert torch.equal(expert, full[i])
                assert (
                    blob[t.slice_offset(i) : t.slice_offset(i) + t.nbytes // t.shape[0]] == t.slice_bytes(i).tobytes()
                )


def test_gguf_bad_files_raise_lite_errors(tmp_path) -> None:
    from lite.errors import LiteError

    with pytest.raises(LiteError, match="not found"):
        GGUFFile(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" * 10)
    with pytest.raises(LiteError, match="not a readable GGUF"):
        GGUFFile(bad)
