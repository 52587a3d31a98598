"""Expert-cache counters, per MoE layer and in total, as a plain dict.

Definitions (per layer, summed for the total):
- hits / misses: per call, each distinct expert the routing needs counts once; a hit means it was in the
  device cache (resident, or its prefetch copy already issued), a miss that it had to be fetched or run on CPU.
- hits_late: hits whose copy (a prefetch, usually) was still in flight when the layer needed the expert, so
  compute waited for it; effective_hit_rate = (hits - hits_late) / (hits + misses): resident or prefetched
  in time.
- prefetches_issued: copies started because the router predicted the expert for a later layer.
- prefetches_used: prefetched experts that were needed before they were evicted (each counts once).
- prefetch_precision = prefetches_used / prefetches_issued.
- prefetch_recall = prefetches_used / (prefetches_used + misses): of the experts that were not resident
  before prefetching, the share that prefetching brought in time.
- bytes_h2d: bytes copied host -> device tier; bytes_disk: bytes read from the GGUF into RAM.
- stall_s: seconds the forward pass waited for expert bytes (copies or disk reads).
- cpu_experts: experts computed on the CPU from the host copy (miss_policy "cpu").
"""

from __future__ import annotations

from typing import Any

COUNTERS = (
    "hits",
    "hits_late",
    "misses",
    "prefetches_issued",
    "prefetches_used",
    "bytes_h2d",
    "bytes_disk",
    "stall_s",
    "cpu_experts",
)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def with_rates(c: dict[str, float]) -> dict[str, Any]:
    """Counters plus the rates derived from them (hit_rate, effective_hit_rate, prefetch precision and recall)."""
    out: dict[str, Any] = dict(c)
    out["hit_rate"] = _ratio(c["hits"], c["hits"] + c["misses"])
    out["effective_hit_rate"] = _ratio(c["hits"] - c["hits_late"], c["hits"] + c["misses"])
    out["prefetch_precision"] = _ratio(c["prefetches_used"], c["prefetches_issued"])
    out["prefetch_recall"] = _ratio(c["prefetches_used"], c["prefetches_used"] + c["misses"])
    return out


class ExpertStats:
    """Mutable counters; the engine adds to them, `as_dict()` renders them."""

    def __init__(self, layers: list[int]):
        self.layers = list(layers)
        self.reset()

    def reset(self) -> None:
        self.per_layer: dict[int, dict[str, float]] = {
            layer: {name: (0.0 if name == "stall_s" else 0) for name in COUNTERS} for layer in self.layers
        }

    def add(self, layer: int, name: str, amount: float = 1) -> None:
        self.per_layer[layer][name] += amount

    def total(self) -> dict[str, float]:
        tot: dict[str, float] = {name: (0.0 if name == "stall_s" else 0) for name in COUNTERS}
        for c in self.per_layer.values():
            for name in COUNTERS:
                tot[name] += c[name]
        return tot

    def as_dict(self, **info: Any) -> dict[str, Any]:
        """{"total": {...}, "layers": {layer: {...}}, **info}; counters plus hit_rate, precision, recall."""
        return {
            "total": with_rates(self.total()),
            "layers": {layer: with_rates(c) for layer, c in self.per_layer.items()},
            **info,
        }
