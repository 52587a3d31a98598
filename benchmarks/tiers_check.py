"""One prompt through every expert tier: the same greedy tokens whether experts sit with the model, in RAM behind a
2-slot cache, or on disk (llama.cpp-made files included), and each tier's prefill rate.

    python benchmarks/tiers_check.py /tmp/v2lite_llama_q4km.gguf [--prompt 600] [--tokens 8]
"""

from __future__ import annotations

import argparse
import time

import torch

import lite

TIERS = {
    "device": {"experts_on": "device"},
    "ram": {"experts_on": "ram", "expert_cache": 2},
    "disk": {"experts_on": "disk", "expert_cache": 2, "ram_memory": 700 << 20},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--prompt", type=int, default=600, help="prompt tokens (fixed pseudo-random ids)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ids = [(i * 7919) % 100000 + 100 for i in range(args.prompt)]
    got = {}
    for name, opts in TIERS.items():
        m = lite.load(args.model, device="cpu", **opts)
        session = m.session(args.prompt + args.tokens + 8)
        t0 = time.perf_counter()
        logits = session.feed(ids)
        rate = len(ids) / (time.perf_counter() - t0)
        got[name] = []
        for _ in range(args.tokens):
            got[name].append(int(logits.argmax()))
            logits = session.feed([got[name][-1]])
        print(f"{name:6s} prefill {rate:7.1f} tok/s  tokens {got[name]}", flush=True)
    print("same tokens on every tier:", len({tuple(v) for v in got.values()}) == 1)


if __name__ == "__main__":
    main()
