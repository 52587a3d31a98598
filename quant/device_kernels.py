"""Device kernels (Triton) that multiply directly by raw GGUF blocks: a matmul and a grouped MoE expert FFN.

Weights stay as the GGUF file's bytes on the device (a uint8 tensor); each kernel dequantizes tiles inside its K loop
and multiplies in float32. Importing this module never needs triton: the kernels (`quant.triton_blocks`,
`quant.triton_moe`) are imported on first use. Triton decides at that import whether they are compiled for the GPU
or run by its CPU interpreter: set `TRITON_INTERPRET=1` before the first call to run them on CPU tensors (slow;
for tests). Nothing here knows about any model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import gguf
import torch

from quant.errors import LiteError

Q = gguf.GGMLQuantizationType

SUPPORTED_QTYPES: tuple[Q, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
    Q.IQ4_XS,
)  # fmt: skip
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SLOT_ALIGN = 16


def interpreted() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether the kernels can run here: triton importable, and a CUDA device or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreted() or torch.cuda.is_available()


def check_supported(qtype: Q, name: str) -> None:
    """Raise LiteError unless the device kernels can multiply a tensor of this type."""
    qtype = Q(qtype)
    if qtype not in SUPPORTED_QTYPES:
        raise LiteError(
            f"tensor {name} has type {qtype.name}, which the device kernels cannot multiply; re-quantize the model "
            f"to one of {', '.join(t.name for t in SUPPORTED_QTYPES)} (e.g. Q4_K), or run it without the device kernels"
        )


def _block(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _nbytes(qtype: Q, rows: int, cols: int) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    return rows * (cols // bs) * ts


def _check_cols(qtype: Q, cols: int, what: str) -> None:
    if cols % _block(qtype):
        raise ValueError(f"{what} has rows of {cols} values, not a multiple of {qtype.name}'s block of {_block(qtype)}")


def _check_activations(x: torch.Tensor, cols: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"{what} must be [rows, {cols}], got {list(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")


def _kernels(name: str) -> ModuleType:
    """quant.triton_blocks or quant.triton_moe, checking that triton and the kernels run in the mode asked for."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as e:
        raise LiteError("the device kernels need triton; install it (pip install triton)") from e
    import importlib

    mode = "1" if interpreted() else "unset"
    # Triton fixes the mode of its own library (tl.sum, tl.zeros...) at its import, and of our kernels at theirs.
    if isinstance(tl.sum, InterpretedFunction) != interpreted():
        raise LiteError(
            f"TRITON_INTERPRET is {mode} now but was not when triton was imported; set it before anything imports "
            "triton (e.g. LITE_DEVICE_KERNELS=triton in the environment, not later)"
        )
    module = importlib.import_module(f"quant.{name}")
    if module.INTERPRETED != interpreted():
        raise LiteError(f"TRITON_INTERPRET is {mode} now but was not when the device kernels were first used")
    return module


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: Q, n: int, k: int) -> torch.Tensor:
    """x [M, k] @ W.T -> [M, n] in x.dtype, accumulated in float32; W (n x k) is `raw`, uint8 GGUF rows.

    M <= 8 runs the GEMV form (many rows of W per program, no tl.dot); larger M the tiled tl.dot form.
    """
    qtype = Q(qtype)
    check_supported(qtype, "matmul weight")
    _check_cols(qtype, k, "the weight")
    _check_activations(x, k, "x")
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != _nbytes(qtype, n, k):
        raise ValueError(f"raw must be 1-D uint8 of {_nbytes(qtype, n, k)} bytes ({qtype.name} {n}x{k})")
    if raw.device != x.device:
        raise ValueError(f"x is on {x.device} but the weight is on {raw.device}")
    return _kernels("triton_blocks").matmul(x.contiguous(), raw, qtype, n, k)


@dataclass(frozen=True)
class ExpertSpec:
    """Where one expert's three matrices lie inside a pool slot, and their GGUF types.

    gate and up are (inter, hidden) (rows of `hidden` values), down is (hidden, inter). Offsets are in bytes from
    the start of the slot and multiples of 16.
    """

    gate_type: Q
    up_type: Q
    down_type: Q
    hidden: int
    inter: int
    gate_offset: int
    up_offset: int
    down_offset: int

    @property
    def nbytes(self) -> int:
        """Bytes one expert occupies in a slot: up to the end of down."""
        return self.down_offset + _nbytes(self.down_type, self.hidden, self.inter)

    @staticmethod
    def packed(gate_type: Q, up_type: Q, down_type: Q, hidden: int, inter: int) -> ExpertSpec:
        """gate at 0, then up, then down, each starting at the next multiple of 16 bytes."""

        def align(v: int) -> int:
            return -(-v // _SLOT_ALIGN) * _SLOT_ALIGN

        up_offset = align(_nbytes(Q(gate_type), inter, hidden))
        down_offset = align(up_offset + _nbytes(Q(up_type), inter, hidden))
        return ExpertSpec(Q(gate_type), Q(up_type), Q(down_type), hidden, inter, 0, up_offset, down_offset)

    def check(self) -> None:
        """Raise LiteError/ValueError for types, shapes or offsets the MoE kernels cannot use."""
        for qtype, what in ((self.gate_type, "gate"), (self.up_type, "up"), (self.down_type, "down")):
            check_supported(qtype, f"expert {what}")
        _check_cols(self.gate_type, self.hidden, "expert gate")
        _check_cols(self.up_type, self.hidden, "expert up")
        _check_cols(self.down_type, self.inter, "expert down")
        offsets = (self.gate_offset, self.up_offset, self.down_offset)
        if any(o < 0 or o % _SLOT_ALIGN for o in offsets):
            raise ValueError(f"expert matrix offsets must be non-negative multiples of {_SLOT_ALIGN}, got {offsets}")


def moe_ffn(
    x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, spec: ExpertSpec
) -> torch.Tensor:
    """Grouped SwiGLU expert FFN: out[t] = sum_j weights[t, j] * down(silu(gate(x[t])) * up(x[t])).

    x [T, hidden] float; pool uint8 [n_slots, slot_bytes] (one expert per row, laid out per `spec`); slots int32/int64
    [T, k], the pool row of each token's j-th expert (must be < n_slots: not checked, as that would wait for the
    device); weights float32 [T, k]. The k terms are added in column order j = 0..k-1 in float32; returns x.dtype.
    """
    spec.check()
    _check_activations(x, spec.hidden, "x")
    if pool.dtype != torch.uint8 or pool.dim() != 2 or not pool.is_contiguous():
        raise ValueError("pool must be a contiguous uint8 [n_slots, slot_bytes] tensor")
    if pool.shape[1] < spec.nbytes or pool.shape[0] == 0:
        raise ValueError(f"pool slots hold {pool.shape[1]} bytes but one expert needs {spec.nbytes}")
    if slots.dim() != 2 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [T, k], got {slots.dtype} {list(slots.shape)}")
    if slots.shape[0] != x.shape[0] or weights.shape != slots.shape:
        raise ValueError(f"x {list(x.shape)}, slots {list(slots.shape)} and weights {list(weights.shape)} disagree")
    devices = {x.device, pool.device, slots.device, weights.device}
    if len(devices) != 1:
        raise ValueError(f"x, pool, slots and weights must be on one device, got {sorted(map(str, devices))}")
    return _kernels("triton_moe").moe(x.contiguous(), pool, slots, weights, spec)
