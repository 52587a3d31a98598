"""Replay a routing trace (offload/trace.py format) against expert-cache policies and report hit rates.
The simulator itself is offload/sim.py.

    python benchmarks/cache_sim.py trace.jsonl [--sizes 2,4,6,12] [--scope layer|global] [--json]

Each MoE-layer call needs a set of experts (the union over its tokens). Like the engine, a call first counts
the needed experts that are resident as hits, then brings in the misses, never evicting an expert of the
same set. Policies, at a cache of C experts per layer:
- LRU: the engine's own `SlotLRU` (so these numbers are what the engine would see without prefetch);
- LFU: evict the expert used least often so far (ties: least recently used);
- Belady: evict the expert whose next use is farthest in the future (clairvoyant optimum);
- prefetch: the engine's LRU + `prefetch_plan` fed with the trace's one-layer-ahead predictions (each
  token's C likeliest experts, as the engine takes), assuming every prefetch lands in time; also its
  precision and recall (definitions in offload/stats.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.sim import report  # noqa: E402
from offload.trace import read_trace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--sizes", default=None, help="experts cached per layer, comma-separated")
    ap.add_argument("--scope", default="layer", choices=["layer", "global"], help="LRU and prefetch slot scope")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    meta, calls = read_trace(args.trace)
    k = int(meta.get("top_k") or (len(calls[0]["selected"][0]) if calls else 1))
    n = int(meta.get("n_experts") or 0)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sorted({k, 2 * k, 3 * k} | ({n} if n else set()))
    rep = report(calls, sizes, args.scope)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    acc = rep["prediction_accuracy"]
    print(
        f"{rep['calls']} layer calls, top-{k}; one-layer-ahead prediction accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'}; scope {args.scope}"
    )
    head = f"{'slots/layer':>11} {'LRU':>6} {'LFU':>6} {'Belady':>6} {'LRU+prefetch':>12} {'(decode)':>8}"
    print(f"{head} {'precision':>9} {'recall':>6}")

    def fmt(v: float | None, width: int) -> str:
        return f"{'n/a' if v is None else f'{v:.3f}':>{width}}"

    for size, r in rep["sizes"].items():
        p = r["prefetch"]
        rates = f"{r['lru']:>6.3f} {r['lfu']:>6.3f} {r['belady']:>6.3f} {p['hit_rate']:>12.3f}"
        print(f"{size:>11} {rates} {fmt(p['decode_hit_rate'], 8)} {fmt(p['precision'], 9)} {fmt(p['recall'], 6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
