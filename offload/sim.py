"""Replay a routing trace (offload/trace.py format) against expert-cache policies: hit rates without running a model.

Each MoE-layer call needs a set of experts (the union over its tokens). Like the engine, a call first counts
the needed experts that are resident as hits, then brings in the misses, never evicting an expert of the
same set. Policies, at a cache of C experts per layer:
- LRU: the engine's own `SlotLRU` and `plan_call` (so these numbers are what the engine would see without prefetch);
- LFU: evict the expert used least often so far (ties: least recently used);
- Belady: evict the expert whose next use is farthest in the future (clairvoyant optimum);
- prefetch: the engine's LRU + `prefetch_plan` fed with the trace's one-layer-ahead predictions (each
  token's C likeliest experts, as the engine takes), assuming every prefetch lands in time; also its
  precision and recall (definitions in offload/stats.py).
`benchmarks/cache_sim.py` is the command line over this module.
"""

from __future__ import annotations

from collections import defaultdict

from offload.policy import SlotLRU, next_slot, plan_call, prefetch_plan

Access = tuple[int, list[int]]  # (layer, sorted distinct experts)


def accesses(calls: list[dict]) -> list[Access]:
    return [(c["layer"], sorted({e for row in c["selected"] for e in row})) for c in calls]


def lru_access(lru: SlotLRU, layer: int, experts: list[int], prefetched: set | None = None) -> tuple[int, int, int]:
    """One layer call against the engine's LRU through the engine's own decisions (`plan_call`, `next_slot`;
    miss_policy="fetch"). Returns (hits, misses, prefetched experts used)."""
    keys = [(layer, e) for e in experts]
    plan = plan_call(lru, keys)
    prefetched = set() if prefetched is None else prefetched
    used = sum(key in prefetched for key in plan.hits)
    prefetched.difference_update(plan.hits)
    prefetched.difference_update(evicted for _, _, evicted in plan.issued)
    remaining = set(plan.deferred)
    for key in plan.deferred:  # fewer slots than the set: evict experts already computed
        prefetched.discard(next_slot(lru, key, remaining)[1])
        remaining.discard(key)
    return len(plan.hits), len(keys) - len(plan.hits), used


def simulate_lru(seq: list[Access], size: int, scope: str = "layer") -> dict:
    lru = SlotLRU(sorted({layer for layer, _ in seq}), size, scope)
    hits = misses = 0
    for layer, experts in seq:
        h, m, _ = lru_access(lru, layer, experts)
        hits, misses = hits + h, misses + m
    return _rates([(hits, misses)])


def _per_layer(seq: list[Access]) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = defaultdict(list)
    for layer, experts in seq:
        out[layer].append(experts)
    return out


def _replay(sets: list[list[int]], size: int, victim, after=None) -> tuple[int, int]:
    """One layer's calls through a cache of `size`; `victim(t, candidates)` picks what to evict. The current
    call's experts are evicted only when the cache is smaller than the call (then ones already computed go)."""
    hits = misses = 0
    cache: set[int] = set()
    for t, experts in enumerate(sets):
        missing = [e for e in experts if e not in cache]
        hits += len(experts) - len(missing)
        misses += len(missing)
        for i, e in enumerate(missing):
            if len(cache) >= size:
                candidates = [c for c in cache if c not in experts] or [c for c in cache if c not in missing[i:]]
                cache.discard(victim(t, candidates))
            cache.add(e)
        if after is not None:
            after(t, experts)
    return hits, misses


def _rates(counts: list[tuple[int, int]]) -> dict:
    hits, misses = sum(h for h, _ in counts), sum(m for _, m in counts)
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1)}


def _lfu_policy():
    """(victim, after) for LFU: least frequently used so far, ties to the least recently used."""
    freq: dict[int, int] = defaultdict(int)
    last: dict[int, int] = {}

    def victim(t: int, cands: list[int]) -> int:
        return min(cands, key=lambda c: (freq[c], last.get(c, t), c))

    def after(t: int, experts: list[int]) -> None:
        for e in experts:
            freq[e] += 1
            last[e] = t

    return victim, after


def _belady_victim(sets: list[list[int]]):
    """Evict the expert needed farthest in the future (never again first)."""
    nxt: dict[int, int] = {}
    next_use: list[dict[int, int]] = [{} for _ in sets]  # next_use[t][e]: first call after t that needs e
    for t in range(len(sets) - 1, -1, -1):
        next_use[t] = dict(nxt)
        for e in sets[t]:
            nxt[e] = t
    return lambda t, cands: max(cands, key=lambda c: (next_use[t].get(c, len(sets)), c))


def simulate_lfu(seq: list[Access], size: int) -> dict:
    """Least frequently used so far; ties go to the least recently used."""
    return _rates([_replay(sets, size, *_lfu_policy()) for sets in _per_layer(seq).values()])


def simulate_belady(seq: list[Access], size: int) -> dict:
    """Clairvoyant: evict the expert needed farthest in the future (never again first)."""
    return _rates([_replay(sets, size, _belady_victim(sets)) for sets in _per_layer(seq).values()])


def simulate_prefetch(calls: list[dict], size: int, scope: str = "layer") -> dict:
    """The engine's policy: before each layer's call, prefetch its predicted experts into the LRU."""
    layers = sorted({c["layer"] for c in calls})
    lru = SlotLRU(layers, size, scope)
    hits = misses = issued = used = 0
    decode = [0, 0]  # hits, misses of one-token calls (decode steps; prompt passes need most experts)
    prefetched: set = set()
    for c in calls:
        layer = c["layer"]
        experts = sorted({e for row in c["selected"] for e in row})
        if c.get("predicted") is not None:
            protected = {k for k in lru.keys() if k[0] == layer - 1} if scope == "global" else set()
            flat = [e for row in c["predicted"] for e in row[:size]]
            for key, _slot, evicted in prefetch_plan(lru, layer, flat, protected):
                prefetched.discard(evicted)
                prefetched.add(key)
                issued += 1
        h, m, u = lru_access(lru, layer, experts, prefetched)
        hits, misses, used = hits + h, misses + m, used + u
        if len(c["selected"]) == 1:
            decode[0], decode[1] = decode[0] + h, decode[1] + m
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / max(hits + misses, 1),
        "decode_hit_rate": decode[0] / sum(decode) if sum(decode) else None,
        "prefetches_issued": issued,
        "prefetches_used": used,
        "precision": used / issued if issued else None,
        "recall": used / (used + misses) if used + misses else None,
    }


def prediction_accuracy(calls: list[dict]) -> float | None:
    """Share of selected (token, expert) pairs that the one-layer-ahead router prediction's top k also named."""
    right = total = 0
    for c in calls:
        if c.get("predicted") is None:
            continue
        for sel, pred in zip(c["selected"], c["predicted"]):
            right += len(set(sel) & set(pred[: len(sel)]))
            total += len(sel)
    return right / total if total else None


def report(calls: list[dict], sizes: list[int], scope: str = "layer") -> dict:
    seq = accesses(calls)
    rows = {}
    for size in sizes:
        rows[size] = {
            "lru": simulate_lru(seq, size, scope)["hit_rate"],
            "lfu": simulate_lfu(seq, size)["hit_rate"],
            "belady": simulate_belady(seq, size)["hit_rate"],
            "prefetch": simulate_prefetch(calls, size, scope),
        }
    return {"calls": len(calls), "prediction_accuracy": prediction_accuracy(calls), "sizes": rows}
