"""GGML block formats: dequantize in vectorised torch (CPU or CUDA), quantize natively.

`dequantize` is bit-identical to `gguf.quants.dequantize`: every float operation below is the same single-rounded
float32 multiply or add, in the same order, as in gguf's numpy code (no fused multiply-add), so results match
bit for bit. `quantize` runs llama.cpp's reference quantizers in C++ (`quant/native.py`, `quant/csrc/quantize_*`),
multi-threaded: llama.cpp's bytes, which are also gguf-py's bytes for the types gguf-py implements (Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1; the K-quants are checked against a numpy port of the reference in the tests). Without the
native extension (no compiler) the 32-value types fall back to gguf-py's numpy code and the K-quants are refused.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import gguf
import numpy as np
import torch

from quant.errors import LiteError
from quant.gguf_file import TensorRef

Q = gguf.GGMLQuantizationType
QK_K = 256

READ_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ4_XS,
)  # fmt: skip
WRITE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def block_size(qtype: Q) -> int:
    """Elements per block (1 for float types)."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: Q) -> int:
    """Bytes per block."""
    return gguf.GGML_QUANT_SIZES[qtype][1]


def bits_per_weight(qtype: Q) -> float:
    """Storage bits per weight, scales included: Q4_K 4.5, Q4_0 4.5, Q8_0 8.5, F16 16."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * ts / bs


def can_quantize(shape: Sequence[int], qtype: Q) -> bool:
    """Whether a tensor of this (torch-order) shape can be written as `qtype`: rows must be whole blocks."""
    return qtype in WRITE_TYPES and len(shape) > 0 and shape[-1] % block_size(qtype) == 0


def nbytes(shape: Sequence[int], qtype: Q) -> int:
    """Bytes a tensor of this shape takes in `qtype`."""
    n = int(np.prod(shape, dtype=np.int64))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return n // bs * ts


# ---------------------------------------------------------------------------------------------------------------
# dequantize


def _as_uint8_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.reshape(-1).view(torch.uint8)
    with warnings.catch_warnings():  # the mmap is read-only; we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _bit_fields(b: torch.Tensor, shifts: range, mask: int, dim: int) -> torch.Tensor:
    """(b >> s) & mask for each s, stacked at `dim`. Scalar shifts: a broadcast tensor shift is ~10x slower."""
    return torch.stack([(b >> s) & mask for s in shifts], dim=dim)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """Split bytes into nibbles, low nibbles of a run of `run` bytes first: [n, k*run] -> [n, k, 2, run]."""
    return _bit_fields(qs.reshape(qs.shape[0], -1, run), range(0, 8, 4), 0x0F, dim=2)


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32)
    return _f16(b, 0) * (q.to(torch.int8) - 8).float()


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 2:6].contiguous().view(torch.int32).reshape(-1)  # [n]: bit j is the high bit of element j
    hi = _bit_fields(qh, range(32), 1, dim=1).to(torch.uint8)  # [n, 32]
    lo = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    return _f16(b, 0) * ((lo | (hi << 4)).to(torch.int8) - 16).float()


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 4:8].contiguous().view(torch.int32).reshape(-1)
    hi = _bit_fields(qh, range(32), 1, dim=1).to(torch.uint8)
    lo = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    return _f16(b, 0) * (lo | (hi << 4)).float() + _f16(b, 2)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of 6-bit (scale, min) pairs of Q4_K/Q5_K into two [n, 8] tensors."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    hi = _bit_fields(b[:, 16:48], range(8), 1, dim=1)  # [n, 8, 32]: bit j of byte l -> sub-block j, item l
    lo = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    q = (lo | (hi << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    lo = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    hi = _bit_fields(b[:, 128:192].reshape(n, 2, 32), range(0, 8, 2), 3, dim=2).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


def _dq_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).reshape(n, 16, 1)
    q = _bit_fields(b[:, 16:80].reshape(n, 2, 32), range(0, 8, 2), 3, dim=2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    lo = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=1)  # scale i: low 4 bits in byte i % 8, nibble i // 8
    hi = _bit_fields(s[:, 8:12], range(0, 8, 2), 3, dim=1).reshape(n, 16)  # high 2 bits: byte 8 + i % 4, pair i // 4
    scales = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _bit_fields(b[:, 32:96].reshape(n, 2, 32), range(0, 8, 2), 3, dim=2).reshape(n, 16, 16)
    qh = _bit_fields(b[:, :32], range(8), 1, dim=1).reshape(n, 16, 16)  # a clear mask bit subtracts 4
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


# IQ4_NL / IQ4_XS's non-linear grid (ggml's kvalues_iq4nl)
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """Bytes of 4-bit grid indices -> float32 grid values, low nibbles of each 16 bytes first: [n, 16k] -> [n, 32k]."""
    kv = torch.tensor(_KVALUES_IQ4NL, dtype=torch.float32, device=qs.device)
    return kv[_nibbles(qs, 16).reshape(qs.shape[0], -1).long()]


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _iq4_values(b[:, 2:])


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sh = b[:, 2].int() | (b[:, 3].int() << 8)  # scales_h, little-endian uint16
    lo = _bit_fields(b[:, 4:8], range(0, 8, 4), 0x0F, dim=2).reshape(n, 8).int()
    hi = _bit_fields(sh, range(0, 16, 2), 3, dim=1)
    dl = (_f16(b, 0) * ((lo | (hi << 4)) - 32).float()).reshape(n, 8, 1)
    return (dl * _iq4_values(b[:, 8:]).reshape(n, 8, 32)).reshape(n, QK_K)


_DEQUANT_BLOCKS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _dq_q8_0,
    Q.Q4_0: _dq_q4_0,
    Q.Q4_1: _dq_q4_1,
    Q.Q5_0: _dq_q5_0,
    Q.Q5_1: _dq_q5_1,
    Q.Q4_K: _dq_q4_k,
    Q.Q5_K: _dq_q5_k,
    Q.Q6_K: _dq_q6_k,
    Q.Q2_K: _dq_q2_k,
    Q.Q3_K: _dq_q3_k,
    Q.IQ4_NL: _dq_iq4_nl,
    Q.IQ4_XS: _dq_iq4_xs,
}

# Blocks dequantized per step: bounds the int/float temporaries to a few tens of MB for big tensors.
_CHUNK_BLOCKS = 1 << 16


def dequantize(raw: np.ndarray | torch.Tensor, qtype: Q, shape: Sequence[int]) -> torch.Tensor:
    """Raw GGML bytes -> float32 tensor of `shape` (torch order), on the device of `raw`."""
    qtype = Q(qtype)
    shape = tuple(int(s) for s in shape)
    data = _as_uint8_tensor(raw)
    expected = nbytes(shape, qtype)
    if data.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {data.numel()}")
    if qtype == Q.F32:
        return data.view(torch.float32).reshape(shape).clone()
    if qtype == Q.F16:
        return data.view(torch.float16).float().reshape(shape)
    if qtype == Q.BF16:
        return data.view(torch.bfloat16).float().reshape(shape)
    fn = _DEQUANT_BLOCKS.get(qtype)
    if fn is None:
        raise LiteError(
            f"unsupported tensor type {qtype.name}; supported: {', '.join(t.name for t in READ_TYPES)}"
            + (", and (dequantized once at load) the other types gguf-py reads" if gguf_can_dequantize(qtype) else "")
        )
    blocks = data.reshape(-1, type_size(qtype))
    out = torch.empty(blocks.shape[0], block_size(qtype), dtype=torch.float32, device=blocks.device)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[i : i + _CHUNK_BLOCKS] = fn(blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(shape)


@functools.cache
def gguf_can_dequantize(qtype: Q) -> bool:
    """Whether gguf-py (the numpy reference) dequantizes `qtype` (IQ2_XXS, IQ3_S, TQ1_0, ...)."""
    try:
        bs, ts = gguf.GGML_QUANT_SIZES[Q(qtype)]
        gguf.quants.dequantize(np.zeros((1, ts), np.uint8), Q(qtype))
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def expand_other_types(tensors: dict[str, TensorRef], to: Q = Q.F32) -> list[Q]:
    """Replace, in place, every tensor of a type lite has no kernels for (not in READ_TYPES) but gguf-py can
    dequantize by its values as `to` (F32 or BF16), dequantized once, in RAM. Returns the types expanded.

    A fallback for community files with rare types: it costs memory (2-4 bytes per weight) and speed, but it loads.
    Types nobody can read are left as they are, for the loader to refuse with one line.
    """
    found: list[Q] = []
    for name, ref in tensors.items():
        if ref.qtype in READ_TYPES or not gguf_can_dequantize(ref.qtype):
            continue
        rows = np.asarray(ref.data).reshape(-1, type_size(ref.qtype))
        chunk = max(1, (1 << 24) // block_size(ref.qtype))  # ~16M values at a time: bounded numpy temporaries
        out = torch.empty(rows.shape[0] * block_size(ref.qtype), dtype=torch.float32 if to == Q.F32 else torch.bfloat16)
        for i in range(0, rows.shape[0], chunk):
            x = torch.from_numpy(gguf.quants.dequantize(rows[i : i + chunk], ref.qtype).reshape(-1))
            out[i * block_size(ref.qtype) : (i + chunk) * block_size(ref.qtype)] = x
        data = out.view(torch.uint8).numpy()  # no file offset: the disk tier copies it from RAM
        tensors[name] = TensorRef(name, to, ref.shape, data, -1)
        if ref.qtype not in found:
            found.append(ref.qtype)
    return found


# ---------------------------------------------------------------------------------------------------------------
# quantize


def quantize(x: np.ndarray | torch.Tensor, qtype: Q) -> np.ndarray:
    """float32 array (torch-order shape, rows last) -> GGML bytes, uint8 [..., bytes per row].

    Float types round to nearest even (as gguf-py and llama.cpp); block types use llama.cpp's reference
    quantizers (see the module docstring). A torch tensor input avoids a copy on the way to the native code.
    """
    qtype = Q(qtype)
    if qtype not in WRITE_TYPES:
        raise LiteError(
            f"cannot write tensor type {qtype.name}; choose one of {', '.join(t.name for t in WRITE_TYPES)}"
        )
    if not can_quantize(x.shape, qtype):
        raise LiteError(
            f"rows of length {x.shape[-1]} are not a multiple of {qtype.name}'s block of {block_size(qtype)}"
        )
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.float().contiguous()
    if qtype in FLOAT_TYPES:
        out = t.to({Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype])
        return out.view(torch.uint8).reshape(*t.shape[:-1], -1).numpy()
    from quant import native

    if native.available():
        return native.quantize(t, int(qtype)).numpy()
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raise LiteError(f"cannot write {qtype.name} without the native extension ({native.build_error()})")
    blocks = gguf.quants.quantize(t.numpy(), qtype)
    return np.ascontiguousarray(blocks).view(np.uint8).reshape(*t.shape[:-1], -1)
