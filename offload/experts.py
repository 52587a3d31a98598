"""One routed expert as three packed matrices, and the arithmetic every tier shares.

`ExpertWeights` is the unit the stores and the device cache move around: built from a GGUF expert slice
(`from_stacks`), copied into preallocated slots (`empty_like` + `copy_`), pinned for async copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.qmatrix import QMatrix


@dataclass
class ExpertWeights:
    gate: QMatrix  # (moe_ff, hidden)
    up: QMatrix  # (moe_ff, hidden)
    down: QMatrix  # (hidden, moe_ff)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, hidden] -> [n, hidden]; SwiGLU like the model's dense MLPs
        return self.down(F.silu(self.gate(x)) * self.up(x))

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def empty_like(self, device: torch.device | str) -> ExpertWeights:
        return ExpertWeights(self.gate.empty_like(device), self.up.empty_like(device), self.down.empty_like(device))

    def copy_(self, src: ExpertWeights, non_blocking: bool = False) -> ExpertWeights:
        self.gate.copy_(src.gate, non_blocking=non_blocking)
        self.up.copy_(src.up, non_blocking=non_blocking)
        self.down.copy_(src.down, non_blocking=non_blocking)
        return self

    def pin_memory(self) -> ExpertWeights:
        return ExpertWeights(self.gate.pin_memory(), self.up.pin_memory(), self.down.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExpertWeights:
        return ExpertWeights(*(m.to(device, non_blocking=non_blocking) for m in (self.gate, self.up, self.down)))


def expert_from_raw(
    raws: tuple, stacks: object, device: torch.device | str, dtype: torch.dtype, layout_for: str | None = None
) -> ExpertWeights:
    """An expert from its three raw byte slices (gate, up, down) on `device`, packed for the kernels of
    `layout_for` (default: `device`; "cuda" with device="cpu" gives a RAM copy ready for CUDA slots)."""
    mats = []
    for raw, ref in zip(raws, (stacks.gate, stacks.up, stacks.down)):
        mats.append(QMatrix.from_gguf(raw, ref.qtype, tuple(ref.shape[1:]), device, dtype, layout_for=layout_for))
    return ExpertWeights(*mats)


def expert_from_stacks(stacks: object, e: int, device: torch.device | str, dtype: torch.dtype) -> ExpertWeights:
    """Expert `e` of one layer's stacks (TensorRefs of shape (n_expert, out, in)), read through the mmap."""
    raws = tuple(ref.slice_bytes(e) for ref in (stacks.gate, stacks.up, stacks.down))
    return expert_from_raw(raws, stacks, device, dtype)


def raw_nbytes(stacks: object) -> int:
    """Bytes of one expert in the GGUF (gate + up + down slices)."""
    return sum(ref.nbytes // ref.shape[0] for ref in (stacks.gate, stacks.up, stacks.down))
