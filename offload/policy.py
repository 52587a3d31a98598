"""Policy, apart from mechanism: which expert sits in which device slot, what to evict, what to prefetch.

Keys are (layer, expert). Slots are grouped: "layer" gives every MoE layer its own fixed set of slots (a
layer's traffic never evicts another layer's experts), "global" pools all slots in one LRU. The engine
(offload/engine.py) and the cache simulator (offload/sim.py) both decide through `plan_call`, `prefetch_plan` and
`prefer_cpu`, so simulated and measured counters agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from quant.errors import LiteError

Key = tuple[int, int]
MISS_POLICIES = ("auto", "fetch", "cpu")  # see offload/build.py; "auto" picks per miss with `prefer_cpu`


def check_miss_policy(value: str) -> str:
    """`value` if it names a miss policy; else LiteError (the one place that checks it)."""
    if value not in MISS_POLICIES:
        raise LiteError(f"miss_policy must be {', '.join(MISS_POLICIES[:-1])} or {MISS_POLICIES[-1]} (got {value!r})")
    return value


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


@dataclass
class CallPlan:
    """What one MoE-layer call does with the experts it needs (all keys of one layer)."""

    hits: list[Key] = field(default_factory=list)  # resident: touched, computed where they are
    to_cpu: list[Key] = field(default_factory=list)  # missing, computed on the CPU from the host copy
    issued: list[tuple[Key, int, Key | None]] = field(default_factory=list)  # missing, copied now: (key, slot, evicted)
    deferred: list[Key] = field(default_factory=list)  # missing, no free slot yet: each waits for `next_slot`


def plan_call(lru: SlotLRU, keys: list[Key], run_on_cpu: Callable[[Key], bool] = lambda key: False) -> CallPlan:
    """Admit a call's experts: hits are touched; each miss runs on the CPU (`run_on_cpu`) or gets a slot without
    evicting another expert of this call; the misses left without one are deferred (fewer slots than experts)."""
    plan = CallPlan()
    to_fetch: list[Key] = []
    for key in keys:
        if key in lru:
            lru.touch(key)
            plan.hits.append(key)
        else:
            (plan.to_cpu if run_on_cpu(key) else to_fetch).append(key)
    needed = set(keys)
    for key in to_fetch:
        got = lru.allocate(key, needed)
        if got is None:
            plan.deferred.append(key)
        else:
            plan.issued.append((key, got[0], got[1]))
    return plan


def next_slot(lru: SlotLRU, key: Key, remaining: set[Key]) -> tuple[int, Key | None]:
    """A slot for a deferred expert: evict one of this call's experts that has already been computed."""
    got = lru.allocate(key, remaining)
    assert got is not None, "a layer needs at least one expert slot"
    return got


def cpu_seconds(cost: Sequence[tuple[int, float]], n_tokens: int) -> float:
    """An expert's CPU time for `n_tokens` tokens from measured (tokens, seconds) points, ascending in tokens:
    piecewise linear between them, the last segment's slope beyond (the CPU kernels change at a row count, so one
    slope does not fit: 8-bit block kernels for few rows, an int8 or bf16 GEMM from ~12-16, quant/prefill.py)."""
    pts = list(cost)
    if len(pts) == 1:
        return pts[0][1]
    for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
        if n_tokens <= n1 or (n1, s1) == pts[-1]:
            return max(s0 + (s1 - s0) * (n_tokens - n0) / (n1 - n0), 0.0)
    raise AssertionError("unreachable")


def prefer_cpu(
    miss_policy: str,
    n_tokens: int,
    cpu_cost: Sequence[tuple[int, float]] | None,
    copy_s: float | None,
    device_free: bool,
) -> bool:
    """Whether a missing expert needed by `n_tokens` tokens runs on the CPU rather than being fetched.

    "auto" compares measured costs: the CPU's (`cpu_seconds` of the measured points) against the copy, plus the
    compute when the "device" is this same CPU (`device_free` False); a GPU computes a resident expert almost for
    free."""
    if miss_policy != "auto":
        return miss_policy == "cpu"
    assert cpu_cost is not None and copy_s is not None, "miss_policy='auto' needs measured costs"
    cpu_s = cpu_seconds(cpu_cost, n_tokens)
    return cpu_s <= copy_s + (0.0 if device_free else cpu_s)


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
