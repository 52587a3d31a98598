"""One routed expert as three GGUF matrices, and the byte layout every tier shares.

An expert is always its GGUF bytes: in RAM the file's own mmap pages (`host_expert`, zero-copy), on the disk
tier one buffer read with `pread`, in a device slot one row of a pool tensor. Every place lays the three
matrices out the same way, by the layer's `ExpertSpec` (gate, up, down at 16-byte-aligned offsets, each in its
own GGUF type: llama.cpp's Q4_K_M files give `ffn_down_exps` a different type on different layers), so moving
an expert is one copy of `spec.nbytes` bytes and any of its copies is multiplied by the same kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quant import prefill
from quant.device_kernels import ExpertSpec
from quant.qmatrix import QMatrix

Raws = tuple[np.ndarray, np.ndarray, np.ndarray]  # an expert's gate, up and down bytes


@dataclass
class ExpertStacks:
    """One MoE layer's routed experts as GGUF stacks (`quant.gguf_file.TensorRef`), each (n_expert, out, in)."""

    gate: Any
    up: Any
    down: Any


@dataclass
class ExpertWeights:
    gate: QMatrix  # (moe_ff, hidden)
    up: QMatrix  # (moe_ff, hidden)
    down: QMatrix  # (hidden, moe_ff)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, hidden] -> [n, hidden]; SwiGLU like the model's dense MLPs
        if x.dim() == 2 and x.shape[0] >= prefill.SWIGLU_MIN_ROWS and self.native:  # prefill: GEMMs
            if x.shape[0] >= prefill.swiglu_from_rows(*self.gate.gguf_weight[1:]):
                return prefill.swiglu(x, self.gate.gguf_weight, self.up.gguf_weight, self.down.gguf_weight)
        return self.down(F.silu(self.gate(x)) * self.up(x))

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def native(self) -> bool:
        """All three matrices run on the native CPU kernels (`moe_one_token` can run them in one call)."""
        return all(m.layout == "gguf" and m._native for m in (self.gate, self.up, self.down))

    def clone(self) -> ExpertWeights:
        """A copy in fresh memory (for when the slot it lives in is about to be refilled)."""
        return ExpertWeights(*(m.empty_like().copy_(m) for m in (self.gate, self.up, self.down)))


def spec_of(stacks: Any) -> ExpertSpec:
    """The slot layout of one layer's experts (its stacks' GGUF types and shapes)."""
    inter, hidden = (int(d) for d in stacks.gate.shape[1:])
    return ExpertSpec.packed(stacks.gate.qtype, stacks.up.qtype, stacks.down.qtype, hidden, inter)


def expert_raws(stacks: Any, e: int) -> Raws:
    """Expert `e`'s gate, up and down bytes: views of the memory-mapped GGUF."""
    return tuple(ref.slice_bytes(e) for ref in (stacks.gate, stacks.up, stacks.down))  # type: ignore[return-value]


def _mats(parts: Sequence[Any], spec: ExpertSpec, device: torch.device | str) -> ExpertWeights:
    shapes = ((spec.inter, spec.hidden), (spec.inter, spec.hidden), (spec.hidden, spec.inter))
    types = (spec.gate_type, spec.up_type, spec.down_type)
    return ExpertWeights(
        *(QMatrix.from_gguf(raw, t, shape, device, kernel="gguf") for raw, t, shape in zip(parts, types, shapes))
    )


def host_expert(raws: Raws, spec: ExpertSpec) -> ExpertWeights:
    """An expert computed on the CPU straight from its host bytes (the mmap, or the disk tier's buffer)."""
    return _mats(raws, spec, "cpu")


def slot_expert(row: torch.Tensor, spec: ExpertSpec) -> ExpertWeights:
    """The expert held in a slot row (uint8 [>= spec.nbytes], on the device): views, no copy."""
    return _mats([row[a:b] for a, b in _ranges(spec)], spec, row.device)


def write_expert(row: torch.Tensor, raws: Raws, spec: ExpertSpec) -> None:
    """Lay an expert's three byte ranges out in a host row (uint8 [>= spec.nbytes]) as `spec` says."""
    dst = row.numpy()
    for raw, (a, b) in zip(raws, _ranges(spec)):
        dst[a:b] = raw


def row_raws(row: np.ndarray, spec: ExpertSpec) -> Raws:
    """The three byte ranges of an expert laid out in `row` by `spec` (views)."""
    return tuple(row[a:b] for a, b in _ranges(spec))  # type: ignore[return-value]


def _ranges(spec: ExpertSpec) -> list[tuple[int, int]]:
    """(start, end) byte range of gate, up and down inside a slot."""
    from quant.formats import nbytes

    mats = (
        (spec.gate_offset, spec.gate_type, (spec.inter, spec.hidden)),
        (spec.up_offset, spec.up_type, (spec.inter, spec.hidden)),
        (spec.down_offset, spec.down_type, (spec.hidden, spec.inter)),
    )
    return [(off, off + nbytes(shape, t)) for off, t, shape in mats]


def moe_one_token(experts: Sequence[ExpertWeights], x: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * experts[i](x) for one token x [1, hidden] -> [1, hidden], in one native call.

    Every expert must be `native` with the same types (one layer's). The terms are added in the given order,
    so callers pass experts in a fixed (ascending id) order for results that do not depend on where they live.
    """
    first = experts[0]
    types = (int(first.gate.qtype), int(first.up.qtype), int(first.down.qtype))
    y = torch.ops.lite_gguf.moe_ffn(
        x.reshape(-1).float(),
        [e.gate.tensors["raw"] for e in experts],
        [e.up.tensors["raw"] for e in experts],
        [e.down.tensors["raw"] for e in experts],
        torch.tensor(weights, dtype=torch.float32),
        *types,
        first.gate.shape[0],
        first.gate._isa,
    )  # [hidden]
    return y.reshape(1, -1).to(x.dtype)


def expert_from_stacks(stacks: Any, e: int, device: torch.device | str, dtype: torch.dtype) -> ExpertWeights:
    """Expert `e` of one layer's stacks (TensorRefs of shape (n_expert, out, in)) on `device`, as GGUF bytes
    (on the CPU, views of the memory-mapped file)."""
    return _mats(expert_raws(stacks, e), spec_of(stacks), device)


def raw_nbytes(stacks: Any) -> int:
    """Bytes of one expert in the GGUF (gate + up + down slices)."""
    return sum(ref.nbytes // ref.shape[0] for ref in (stacks.gate, stacks.up, stacks.down))
