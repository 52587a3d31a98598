"""Peak RSS of lite on a full-size, sparse V2-Lite-shaped Q4_K_M GGUF (its tensor data reads as zeros) with the experts
on the disk tier: checks that memory stays within ram_memory + the dense weights + 1 GiB.

    python benchmarks/rss_full_size.py --ram 2GiB --tokens 8
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ram", default="2GiB")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--model", default="lite", choices=["lite", "v2"])
    args = p.parse_args()
    from full_size_gguf import write_full_size_gguf

    import lite
    from offload.planner import parse_size

    with tempfile.TemporaryDirectory() as d:
        path = write_full_size_gguf(Path(d) / "full.gguf", args.model)
        t0 = time.perf_counter()
        model = lite.load(str(path), device="cpu", experts_on="disk", ram_memory=args.ram, ctx=args.ctx)
        load_s = time.perf_counter() - t0
        plan = model.experts.plan
        s = model.session(args.ctx)
        s.feed([1, 2, 3, 4])
        t0 = time.perf_counter()
        for i in range(args.tokens):
            s.feed([5 + i])
        tps = args.tokens / (time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ram = parse_size(args.ram)
        bound = ram + plan.dense_bytes + (1 << 30)
        print(json.dumps({"model": args.model, "ram_memory": ram, "dense_bytes": plan.dense_bytes,
                          "slots_per_layer": plan.slots_per_layer, "lru_bytes": plan.ram_expert_bytes,
                          "peak_rss": peak, "bound": bound, "within": peak <= bound, "load_s": round(load_s, 1),
                          "decode_tok_s": round(tps, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
