"""All experts resident on the device: the baseline expert backend, with no offload machinery.

Prefill computes each expert once on the tokens routed to it (a Python loop over experts, never over tokens);
decode (one token) loops over its k experts.
"""

from __future__ import annotations

import torch

from offload.experts import ExpertWeights, expert_from_stacks


class ResidentExperts:
    """`experts(layer, x, ids, weights)` per docs/DESIGN.md, every expert kept as packed matrices on `device`."""

    def __init__(self, stacks: dict, device: torch.device | str, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.layers: dict[int, list[ExpertWeights]] = {
            layer: [expert_from_stacks(s, e, self.device, dtype) for e in range(s.gate.shape[0])]
            for layer, s in stacks.items()
        }

    def on_residual(self, layer: int, h: torch.Tensor) -> None:
        pass  # everything is resident: nothing to prefetch

    def stats(self) -> dict:
        return {}  # no cache, nothing to count

    def reset_stats(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for experts in self.layers.values() for e in experts)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden], ids: [T, k], weights: [T, k] float32 -> sum_k weights[t, k] * expert_ids[t, k](x[t])
        experts = self.layers[layer]
        T, k = ids.shape
        w = weights.to(x.dtype)
        if T == 1:  # decode: k experts, each weighted by a Python float (no per-expert tensor indexing)
            out = torch.zeros_like(x)
            for e, weight in zip(ids[0].tolist(), weights[0].tolist()):
                out.add_(experts[e](x), alpha=weight)
            return out
        flat = ids.flatten()  # [T·k], entry i belongs to token i // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(experts)).tolist()
        tokens = order // k  # token of each sorted entry
        xs = x[tokens]  # [T·k, hidden], grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count:
                ys[start : start + count] = experts[e](xs[start : start + count])
                start += count
        ys *= w.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, ys)
