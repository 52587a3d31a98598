"""The interface between the model and whatever holds its routed experts (docs/DESIGN.md, "The expert interface")."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ExpertBackend(Protocol):
    """What `lite.model.Transformer` calls for its MoE layers. `ExpertEngine` and `ResidentExperts` implement it."""

    def on_residual(self, layer: int, h: torch.Tensor) -> None:
        """h [T, hidden]: the residual stream leaving `layer` (a hint: predict and prefetch later layers' experts)."""
        ...

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (ffn-normed), ids [T, k], weights [T, k] -> sum_k weights[t, k] * expert_ids[t, k](x[t])."""
        ...

    def stats(self) -> dict[str, Any]:
        """Expert-cache counters (offload/stats.py); {} where nothing is cached."""
        ...

    def reset_stats(self) -> None: ...
