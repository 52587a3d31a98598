"""QMatrix: a linear weight kept in compact form, `y = qm(x)` meaning `x @ W.T`.

4-bit GGML types (Q4_0, Q4_1, Q4_K) stay packed: every 32-weight group maps exactly onto torch's int4pack
("tinygemm") convention, w = (q - 8) * scale + zero with q in 0..15 and one (scale, zero) per group of 32:

    Q4_0  w = d * (q - 8)                   scale = d          zero = 0
    Q4_1  w = d * q + m                     scale = d          zero = m + 8 d
    Q4_K  w = d sc_j * q - dmin m_j         scale = d sc_j     zero = 8 d sc_j - dmin m_j   (sub-block j of 32)

The packed weight is 4 bits/weight plus a bf16 (scale, zero) pair per group (1 bit/weight), and it is multiplied by
`_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA). Those kernels take bf16 activations and bf16 scales
(float32 activations run ~40x slower on CPU), so x is cast to bf16 inside and the result cast back to x's dtype.
The packed layout is device-specific (and ISA-specific on CPU); `layout` records which kernel it is packed for.
Every other type is dequantized once at load to a dense weight of the requested dtype.

On the CPU, types the native kernels read (quant/native.py's SUPPORTED_QTYPES, from the extension's type table:
Q8_0, Q4_0, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) use layout "gguf"
instead: the GGUF bytes themselves (a zero-copy view of the memory-mapped file), multiplied with 8-bit
activations like llama.cpp. Large batches (prefill) dequantize to bf16 per call instead, where measured faster.
`LITE_CPU_KERNEL` picks the CPU kernel: "native" (default; int4pack for the 4-bit types native lacks, or when the
extension cannot build), "int4pack" (the 4-bit types packed, the rest dense) or "dense" (everything dequantized).
F32/F16/BF16 are always dense, so an f32 GGUF stays exact.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from quant import native, prefill
from quant.errors import LiteError
from quant.formats import _as_uint8_tensor, _f16, _k_scale_min, _nibbles, dequantize, nbytes

Q = gguf.GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
CPU_KERNELS = ("native", "int4pack", "dense")
GROUP = 32
_NO_TENSOR = torch.empty(0)
_N_ALIGN = 16  # the CPU packer needs out_features % 16 == 0 (CUDA: % 8); smaller or odd shapes are zero-padded


@functools.cache
def native_types() -> tuple[Q, ...]:
    """The types the native CPU kernels read (the extension's type table; empty when it cannot build)."""
    return tuple(Q.__members__[name] for name in native.SUPPORTED_QTYPES)


def __getattr__(name: str) -> tuple[Q, ...]:
    if name == "NATIVE_TYPES":  # computed on first access: importing this module never builds the extension
        return native_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _int4_params(raw: torch.Tensor, qtype: Q, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGML 4-bit bytes -> q int32 [n, k] (0..15), scale and zero float32 [n, k/32]."""
    if qtype == Q.Q4_0:
        b = raw.reshape(-1, 18)
        q = _nibbles(b[:, 2:], 16)
        scale = _f16(b, 0)
        zero = torch.zeros_like(scale)
    elif qtype == Q.Q4_1:
        b = raw.reshape(-1, 20)
        q = _nibbles(b[:, 4:], 16)
        scale = _f16(b, 0)
        zero = _f16(b, 2) + 8 * scale
    elif qtype == Q.Q4_K:
        b = raw.reshape(-1, 144)
        sc, mn = _k_scale_min(b[:, 4:16])
        scale = _f16(b, 0) * sc.float()  # [n_superblocks, 8]
        zero = 8 * scale - _f16(b, 2) * mn.float()
        q = _nibbles(b[:, 16:], 32)  # [n_superblocks, 4, 2, 32]: sub-blocks 0..7 in order
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type")
    return q.reshape(n, k).to(torch.int32), scale.reshape(n, k // GROUP), zero.reshape(n, k // GROUP)


@functools.cache
def _has_int4_kernel(layout: str) -> bool:
    """CPU always; CUDA's tinygemm kernel needs compute capability 8.0 (Ampere) or newer."""
    if layout == "cpu":
        return True
    return layout == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def cpu_kernel(kernel: str | None = None) -> str:
    """The CPU kernel choice: `kernel`, else $LITE_CPU_KERNEL, else "native"."""
    kernel = kernel or os.environ.get("LITE_CPU_KERNEL") or "native"
    if kernel not in CPU_KERNELS:
        raise LiteError(f"unknown CPU kernel {kernel!r}: use one of {', '.join(CPU_KERNELS)} (LITE_CPU_KERNEL)")
    return kernel


def device_kernels_forced() -> bool:
    """$LITE_DEVICE_KERNELS=triton: run the device (Triton) kernels on CPU tensors too, interpreted, so the GPU code
    path's logits can be compared with the CPU path's on any machine."""
    mode = os.environ.get("LITE_DEVICE_KERNELS", "")
    if mode not in ("", "triton"):
        raise LiteError(f"unknown LITE_DEVICE_KERNELS={mode!r}: use triton, or leave it unset")
    if mode == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter runs the kernels
    return mode == "triton"


def choose_layout(qtype: Q, k: int, layout_for: str, kernel: str | None = None) -> str:
    """Which layout a weight of `qtype` with rows of `k` gets for the kernels of device type `layout_for`.

    On CUDA (and on the CPU under $LITE_DEVICE_KERNELS=triton) every weight keeps its GGUF bytes ("gguf") and the
    Triton kernels multiply them; a type those kernels lack is refused, never silently expanded."""
    if layout_for == "cuda" or device_kernels_forced():
        from quant import device_kernels

        device_kernels.check_supported(qtype, "a weight")
        return "gguf"
    if layout_for == "cpu":
        kernel = cpu_kernel(kernel)
        if kernel == "native" and native.available() and qtype in native_types():
            return "gguf"
        if kernel == "dense":
            return "dense"
    if qtype in INT4_TYPES and k % GROUP == 0 and _has_int4_kernel(layout_for):
        return layout_for
    return "dense"


def loaded_nbytes(qtype: Q, shape: Sequence[int], layout_for: str, dtype_bytes: int) -> int:
    """Bytes a weight of `shape` (.., out, in) takes once loaded by `from_gguf` for device type `layout_for`:
    the GGUF bytes themselves ("gguf"), torch int4pack (4 bits + a bf16 scale/zero pair per 32, rows padded
    to 16), or dense values of `dtype_bytes`. The planner counts memory with this."""
    *lead, n, k = (int(d) for d in shape)
    count = 1
    for d in lead:
        count *= d
    layout = "gguf" if layout_for == "cuda" else choose_layout(Q(qtype), k, layout_for)
    if layout == "gguf":
        return count * nbytes((n, k), Q(qtype))
    if layout in ("cpu", "cuda"):
        pn = -(-n // _N_ALIGN) * _N_ALIGN
        return count * (pn * k // 2 + (k // GROUP) * pn * 4)
    return count * n * k * dtype_bytes


def _isa_level() -> int:
    """$LITE_NATIVE_ISA as the kernels' level (-1: the best this CPU has), read once per weight."""
    isa = os.environ.get("LITE_NATIVE_ISA")
    if isa and isa not in native.ISAS:
        raise LiteError(f"unknown ISA {isa!r}: use one of {', '.join(native.ISAS)} (LITE_NATIVE_ISA)")
    return native.ISAS[isa] if isa else -1


def _inner_k_tiles(k: int) -> int:
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2


def _pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """q int32 [n, k] on the layout's device -> that kernel's packed weight."""
    if layout == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # CUDA takes [n, k/2] bytes, even k in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(q.shape[1]))


def _packed_nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


@functools.lru_cache(maxsize=4)  # an int64 per weight: keep few (only `cat` fallbacks, `to` and `dequantize` use it)
def _nibble_sources(layout: str, n: int, k: int) -> torch.Tensor:
    """For each nibble of the packed weight, the flat index of q it holds (int64 [n*k], on the layout's device).

    The packers only permute nibbles, so packing the bit planes of each element's own index reveals the permutation,
    whatever the CPU's ISA-specific blocking is.
    """
    device = "cuda" if layout == "cuda" else "cpu"
    idx = torch.arange(n * k, device=device, dtype=torch.int64).reshape(n, k)
    src = torch.zeros(n * k, device=device, dtype=torch.int64)
    for plane in range((max(n * k - 1, 1).bit_length() + 3) // 4):
        q = ((idx >> (4 * plane)) & 15).to(torch.int32)
        src |= _packed_nibbles(_pack(q, layout)).to(torch.int64) << (4 * plane)
    return src


_ROW_BLOCK = 64  # the packers lay out at most this many rows together (CPU: 16/32/64 by ISA; CUDA: 8)


@functools.cache
def _packing_is_row_local(layout: str, k: int) -> bool:
    """Whether packing two 64-row matrices equals packing them stacked: then packed parts concatenate as bytes."""
    device = "cuda" if layout == "cuda" else "cpu"
    g = torch.Generator().manual_seed(0)
    qa, qb = (torch.randint(0, 16, (_ROW_BLOCK, k), generator=g, dtype=torch.int32).to(device) for _ in range(2))
    return torch.equal(_pack(torch.cat([qa, qb]), layout), torch.cat([_pack(qa, layout), _pack(qb, layout)]))


def _unpack(packed: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """Inverse of `_pack`: packed weight -> q int32 [n, k], on the packed weight's device."""
    nib = _packed_nibbles(packed)
    src = _nibble_sources(layout, n, k).to(packed.device)
    q = torch.empty(n * k, dtype=torch.int32, device=packed.device)
    q[src] = nib.to(torch.int32)
    return q.reshape(n, k)


class QMatrix:
    """A weight W [out, in] in compact form; `qm(x)` computes `x @ W.T` for x [..., in]."""

    def __init__(
        self,
        shape: Sequence[int],
        qtype: Q,
        layout: str,
        tensors: dict[str, torch.Tensor],
        padded_n: int,
        readonly: bool = False,
    ):
        self.shape = (int(shape[0]), int(shape[1]))
        self.qtype = Q(qtype)
        # "cpu" / "cuda": the int4 kernel the weight is packed for; "gguf": raw GGUF blocks for the native CPU
        # kernels; "dense": a plain matrix
        self.layout = layout
        # int4: packed, scales_zeros [in/32, padded_n, 2] bf16; gguf: raw (uint8, 1-D); dense: weight [out, in]
        self.tensors = tensors
        self.padded_n = padded_n
        self.readonly = readonly  # a view of a read-only memory map: never written into
        none = _NO_TENSOR  # each layout has only its own tensors
        self._packed, self._sz = tensors.get("packed", none), tensors.get("scales_zeros", none)
        self._raw = tensors.get("raw", none)
        if layout == "cpu":
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        elif layout == "cuda":
            self._mm = torch.ops.aten._weight_int4pack_mm
        elif layout == "gguf":
            self._set_gguf_kernel()

    def _set_gguf_kernel(self) -> None:
        """Pick the kernel for GGUF bytes: Triton on CUDA (or forced), native on the CPU, else dequantize per call."""
        self._qid, self._isa = int(self.qtype), _isa_level()
        self._device_kernel = self._raw.device.type == "cuda" or device_kernels_forced()
        self._native = (
            not self._device_kernel
            and cpu_kernel() == "native"
            and self._raw.device.type == "cpu"
            and native.available()
            and self.qtype in native_types()
        )
        # rows of x from which a GEMM (quant/prefill.py) beats the 8-bit kernel, whose cost grows linearly with rows
        self._dequant_from = prefill.from_rows(self.qtype, self.shape) if self._native else 0
        if self._native:
            self._mm = torch.ops.lite_gguf.matmul

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls,
        raw: np.ndarray | torch.Tensor,
        qtype: Q,
        shape: Sequence[int],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        layout_for: str | torch.device | None = None,
        kernel: str | None = None,
    ) -> QMatrix:
        """Raw GGML bytes of a (out, in) weight -> QMatrix on `device`.

        On the CPU, types the native kernels read keep their GGUF bytes (layout "gguf", zero-copy: `raw` itself
        when it is a numpy array or uint8 tensor, e.g. a view of the memory-mapped file). 4-bit types are
        otherwise packed for the int4 kernel of `layout_for` (default: `device`), e.g. device="cpu",
        layout_for="cuda" gives a RAM copy ready to be copied into CUDA cache slots. Other types (and 4-bit ones
        where no int4 kernel exists, e.g. pre-Ampere GPUs) become a dense `dtype` weight (float32 keeps an f32 GGUF
        exact). `kernel` ("native", "int4pack", "dense") overrides $LITE_CPU_KERNEL for CPU layouts; "gguf" keeps
        the GGUF bytes on any device and for any type (routed experts: the bytes the offload tiers move), multiplied
        by the device kernels, the native CPU kernels, or (a type native lacks) a per-call dequantization.
        """
        qtype, device = Q(qtype), torch.device(device)
        if len(shape) != 2:
            raise ValueError(f"QMatrix needs a 2-D (out, in) shape, got {tuple(shape)}")
        n, k = (int(s) for s in shape)
        target = torch.device(layout_for or device).type
        layout = "gguf" if kernel == "gguf" else choose_layout(qtype, k, target, kernel)
        if layout == "dense":
            return cls.from_float(dequantize(raw, qtype, (n, k)), device, dtype, qtype=qtype)
        data = native.as_raw(raw) if layout == "gguf" else _as_uint8_tensor(raw)
        if layout == "gguf" and data.device != device:
            data = data.to(device)
        if data.numel() != nbytes((n, k), qtype):
            raise ValueError(f"{qtype.name} weight of shape {(n, k)} needs {nbytes((n, k), qtype)} bytes")
        if layout == "gguf":
            readonly = device.type == "cpu" and isinstance(raw, np.ndarray) and not raw.flags.writeable
            return cls((n, k), qtype, "gguf", {"raw": data}, n, readonly=readonly)
        work = layout if layout == "cuda" else "cpu"  # the packer runs on the layout's own device
        q, scale, zero = _int4_params(data.to(work), qtype, n, k)
        pn = -(-n // _N_ALIGN) * _N_ALIGN
        if pn != n:  # padding rows: q = 8 with scale = zero = 0 contribute exact zeros
            q = F.pad(q, (0, 0, 0, pn - n), value=8)
            scale, zero = F.pad(scale, (0, 0, 0, pn - n)), F.pad(zero, (0, 0, 0, pn - n))
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [k/32, pn, 2]
        tensors = {"packed": _pack(q, layout).to(device), "scales_zeros": scales_zeros.to(device)}
        return cls((n, k), qtype, layout, tensors, pn)

    @classmethod
    def from_float(
        cls, w: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, qtype: Q = Q.F32
    ) -> QMatrix:
        """A dense weight [out, in] (no quantization), stored as `dtype` on `device`."""
        if w.dim() != 2:
            raise ValueError(f"QMatrix needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
        weight = w.to(device=device, dtype=dtype).contiguous()
        return cls(tuple(w.shape), qtype, "dense", {"weight": weight}, int(w.shape[0]))

    @staticmethod
    def cat(parts: Sequence[QMatrix]) -> QMatrix:
        """Stack weights along `out` (e.g. gate and up into one [2*inter, hidden] matrix): one kernel call for two."""
        first = parts[0]
        if any(p.layout != first.layout or p.shape[1] != first.shape[1] for p in parts):
            raise ValueError("QMatrix.cat needs parts with the same layout and in_features")
        if first.layout == "dense":
            return QMatrix.from_float(torch.cat([p.tensors["weight"] for p in parts]), first.device, first.dtype)
        n, k = sum(p.shape[0] for p in parts), first.shape[1]
        if first.layout == "gguf":  # GGUF rows are independent: the raw bytes concatenate (a copy out of the mmap)
            if any(p.qtype != first.qtype for p in parts):
                raise ValueError("QMatrix.cat needs gguf parts of one type")
            return QMatrix((n, k), first.qtype, "gguf", {"raw": torch.cat([p._raw for p in parts])}, n)
        if all(p.shape[0] % _ROW_BLOCK == 0 for p in parts) and _packing_is_row_local(first.layout, k):
            tensors = {  # whole row blocks: join the packed bytes, no repacking
                "packed": torch.cat([p._packed for p in parts]),
                "scales_zeros": torch.cat([p._sz for p in parts], 1),
            }
            return QMatrix((n, k), first.qtype, first.layout, tensors, n)
        qs, szs = [], []
        for p in parts:
            q = _unpack(p.tensors["packed"], p.layout, p.padded_n, p.shape[1])
            qs.append(q[: p.shape[0]])
            szs.append(p.tensors["scales_zeros"][:, : p.shape[0]])
        q, sz = torch.cat(qs), torch.cat(szs, dim=1)
        pn = -(-n // _N_ALIGN) * _N_ALIGN
        if pn != n:
            q, sz = F.pad(q, (0, 0, 0, pn - n), value=8), F.pad(sz, (0, 0, 0, pn - n))
        tensors = {"packed": _pack(q, first.layout), "scales_zeros": sz.contiguous()}
        return QMatrix((n, k), first.qtype, first.layout, tensors, pn)

    # ---- compute -----------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ W.T [..., out], in x's dtype."""
        if self.layout == "dense":
            w = self.tensors["weight"]
            y = prefill.linear(x.to(w.dtype) if x.dim() == 2 else x.reshape(-1, self.shape[1]).to(w.dtype), w)
            return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])).to(x.dtype)
        # Each skipped reshape/cast saves a few µs: this runs ~18 times per MoE layer per token.
        x2 = x if x.dim() == 2 else x.reshape(-1, self.shape[1])
        if self.layout == "gguf":
            if self._device_kernel:  # Triton on the raw blocks (interpreted on CPU tensors)
                from quant import device_kernels

                y = device_kernels.gguf_matmul(x2.contiguous(), self._raw, self.qtype, *self.shape)
            elif x2.shape[0] < self._dequant_from:  # 8-bit activations, integer block dots on the GGUF bytes
                y = self._mm(
                    x2 if x2.dtype == torch.float32 else x2.float(), self._raw, self._qid, *self.shape, self._isa
                )
            elif self._native:  # a large batch: one int8 or bf16 GEMM on the weight decoded for this call
                y = prefill.gguf_linear(x2, self._raw, self.qtype, self.shape)
            else:  # a type native lacks: a float32 GEMM on the weight dequantized for this call
                y = F.linear(x2.to(torch.float32), dequantize(self._raw, self.qtype, self.shape))
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])
        y = self._mm(x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16), self._packed, GROUP, self._sz)
        if self.padded_n != self.shape[0]:
            y = y[:, : self.shape[0]]
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])

    @property
    def expand_from(self) -> int:
        """Rows of x from which a native "gguf" weight is decoded for one GEMM (quant/prefill.py)."""
        return self._dequant_from if self.layout == "gguf" and self._native else 1 << 62

    @property
    def gguf_weight(self) -> tuple[torch.Tensor, Q, tuple[int, int]]:
        """(raw bytes, type, shape) of a "gguf" weight: what quant/prefill.py multiplies."""
        return self._raw, self.qtype, self.shape

    def dequantize(self) -> torch.Tensor:
        """The effective weight float32 [out, in] (for int4: (q - 8) * scale + zero with the stored bf16 pairs)."""
        if self.layout == "dense":
            return self.tensors["weight"].float()
        if self.layout == "gguf":
            return dequantize(self._raw, self.qtype, self.shape)
        n, k = self.shape
        q = _unpack(self.tensors["packed"], self.layout, self.padded_n, k)[:n].float()
        sz = self.tensors["scales_zeros"][:, :n].float().repeat_interleave(GROUP, dim=0)  # [k, n, 2]
        return (q - 8) * sz[..., 0].t() + sz[..., 1].t()

    # ---- memory ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: bf16 for packed 4-bit weights, float32 for gguf, the stored dtype for dense ones."""
        if self.layout == "dense":
            return self.tensors["weight"].dtype
        return torch.float32 if self.layout == "gguf" else torch.bfloat16

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _with(self, tensors: dict[str, torch.Tensor], layout: str | None = None) -> QMatrix:
        shared = any(t.data_ptr() == self.tensors[k].data_ptr() for k, t in tensors.items() if k in self.tensors)
        return QMatrix(self.shape, self.qtype, layout or self.layout, tensors, self.padded_n, self.readonly and shared)

    def to(
        self, device: str | torch.device, non_blocking: bool = False, layout_for: str | torch.device | None = None
    ) -> QMatrix:
        """Move to `device`. A packed weight is repacked when its layout differs from `layout_for` (default: the
        target device's type); pass layout_for explicitly to move the bytes as they are (e.g. a CUDA-layout weight
        staged in pinned RAM). A gguf weight moves its GGUF bytes as they are (every device multiplies them)."""
        device = torch.device(device)
        layout = torch.device(layout_for or device).type
        if self.layout in ("dense", "gguf", layout):
            return self._with({k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors.items()})
        q = _unpack(self.tensors["packed"], self.layout, self.padded_n, self.shape[1])
        work = "cuda" if layout == "cuda" else "cpu"
        packed = _pack(q.to(work), layout).to(device)
        return self._with({"packed": packed, "scales_zeros": self.tensors["scales_zeros"].to(device)}, layout)

    def pin_memory(self) -> QMatrix:
        return self._with({k: t.pin_memory() for k, t in self.tensors.items()})

    def empty_like(self, device: str | torch.device | None = None) -> QMatrix:
        """Same layout and sizes, uninitialised, on `device` (a preallocated cache slot)."""
        device = self.device if device is None else torch.device(device)
        return self._with({k: torch.empty_like(t, device=device) for k, t in self.tensors.items()})

    def copy_(self, src: QMatrix, non_blocking: bool = False) -> QMatrix:
        """Copy `src`'s bytes into this weight's storage (same shape, layout and byte sizes), in place."""
        if (
            src.layout != self.layout
            or src.shape != self.shape
            or src.tensors.keys() != self.tensors.keys()
            or any(t.shape != src.tensors[k].shape for k, t in self.tensors.items())
        ):
            raise ValueError(f"cannot copy a {src.layout} {src.shape} weight into a {self.layout} {self.shape} one")
        if self.readonly:
            raise ValueError("cannot copy into a weight that is a view of a read-only memory-mapped file")
        for k, t in self.tensors.items():
            t.copy_(src.tensors[k], non_blocking=non_blocking)
        self.qtype = src.qtype
        if self.layout == "gguf":
            self._set_gguf_kernel()
        return self

    def __repr__(self) -> str:
        return f"QMatrix({self.qtype.name}, shape={self.shape}, layout={self.layout}, device={self.device})"
