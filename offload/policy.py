"""Policy, apart from mechanism: which expert sits in which device slot, what to evict, what to prefetch.

Keys are (layer, expert). Slots are grouped: "layer" gives every MoE layer its own fixed set of slots (a
layer's traffic never evicts another layer's experts), "global" pools all slots in one LRU. The cache
simulator (benchmarks/cache_sim.py) replays routing traces through these same classes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

Key = tuple[int, int]


class SlotLRU:
    """LRU bookkeeping over `slots_per_group * len(groups)` numbered slots."""

    def __init__(self, layers: Iterable[int], slots_per_layer: int, scope: str = "layer"):
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', not {scope!r}")
        self.scope = scope
        layers = list(layers)
        groups = layers if scope == "layer" else [None]
        per_group = slots_per_layer if scope == "layer" else slots_per_layer * len(layers)
        self.capacity = per_group
        self.free: dict[object, list[int]] = {}
        self.order: dict[object, OrderedDict[Key, int]] = {}
        for i, g in enumerate(groups):
            self.free[g] = list(range(i * per_group, (i + 1) * per_group))[::-1]
            self.order[g] = OrderedDict()
        self.n_slots = per_group * len(groups)

    def _group(self, key: Key) -> object:
        return key[0] if self.scope == "layer" else None

    def lookup(self, key: Key) -> int | None:
        return self.order[self._group(key)].get(key)

    def __contains__(self, key: Key) -> bool:
        return self.lookup(key) is not None

    def touch(self, key: Key) -> None:
        self.order[self._group(key)].move_to_end(key)

    def allocate(self, key: Key, protected: set[Key] | frozenset = frozenset()) -> tuple[int, Key | None] | None:
        """A slot for `key` (most recently used): a free one, or the least recently used unprotected one.
        Returns (slot, evicted key or None), or None when every slot holds a protected key."""
        g = self._group(key)
        order = self.order[g]
        assert key not in order, key
        if self.free[g]:
            slot, evicted = self.free[g].pop(), None
        else:
            evicted = next((k for k in order if k not in protected), None)
            if evicted is None:
                return None
            slot = order.pop(evicted)
        order[key] = slot
        return slot, evicted

    def remove(self, key: Key) -> None:
        g = self._group(key)
        self.free[g].append(self.order[g].pop(key))

    def keys(self) -> list[Key]:
        return [k for order in self.order.values() for k in order]


def predicted_keys(layer: int, ids_rows: Iterable[Iterable[int]]) -> list[Key]:
    """Distinct (layer, expert) keys of a prediction, in order of first appearance (most confident first when
    the router returns its top-k sorted)."""
    seen: dict[Key, None] = {}
    for row in ids_rows:
        for e in row:
            seen.setdefault((layer, int(e)), None)
    return list(seen)


def prefetch_plan(
    lru: SlotLRU,
    layer: int,
    ids: list[int],
    protected: set[Key],
    in_host: Callable[[Key], bool] | None = None,
    max_host_misses: int | None = None,
) -> list[tuple[Key, int, Key | None]]:
    """Which predicted experts of `layer` to bring in, and where: the most often predicted first (ties: the
    order of `ids`, likeliest first), at most one group's capacity, never evicting a protected key (the
    current layer's) nor another predicted one. With `in_host` (is the expert already in the host tier's RAM?),
    at most `max_host_misses` of them may need a read from disk. Allocates the slots in `lru`; returns (key,
    slot, evicted key or None) for each copy to start."""
    counts: dict[int, int] = {}
    for e in ids:
        counts[e] = counts.get(e, 0) + 1
    keys: list[Key] = []  # the likeliest experts that may come in, at most a group's capacity
    reads = 0
    for e in sorted(counts, key=lambda e: -counts[e]):  # stable: ties keep the order of ids
        if len(keys) == lru.capacity:
            break
        key = (layer, e)
        if key not in lru and in_host is not None and max_host_misses is not None and not in_host(key):
            if reads == max_host_misses:
                continue
            reads += 1
        keys.append(key)
    keep = protected | set(keys)
    out = []
    for key in keys:
        if key in lru:
            continue
        got = lru.allocate(key, keep)
        if got is None:
            break
        out.append((key, got[0], got[1]))
    return out
