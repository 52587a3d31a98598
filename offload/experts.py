"""One routed expert as three packed matrices, and the arithmetic every tier shares.

`ExpertWeights` is the unit the stores and the device cache move around: built from a GGUF expert slice
(`from_stacks`), copied into preallocated slots (`empty_like` + `copy_`), pinned for async copies.
`moe_one_token` runs one token through several experts kept as GGUF bytes on the CPU in one native call.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    @property
    def native(self) -> bool:
        """All three matrices are GGUF bytes for the native CPU kernels (`moe_one_token` can run them)."""
        return self.gate.layout == self.up.layout == self.down.layout == "gguf"

    def clone(self) -> ExpertWeights:
        """A copy in fresh memory (for when the slot it lives in is about to be refilled)."""
        return self.empty_like(self.gate.device).copy_(self)


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
