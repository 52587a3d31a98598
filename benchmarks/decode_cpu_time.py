"""CPU time per decode step (not wall time): compares two trees on a shared or noisy machine, where wall-clock
decode swings by a third between runs.

    python benchmarks/decode_cpu_time.py --model /tmp/v2lite_q4km27.gguf [--threads 1] [--steps 56]
"""

from __future__ import annotations

import argparse
import time

import torch

import lite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/v2lite_q4km27.gguf")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=56)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = lite.load(args.model, device="cpu")
    session = m.session(32 + 8 + args.steps + 8)
    session.feed(list(range(100, 132)))  # a 32-token prompt
    for t in range(200, 208):  # warm-up steps
        session.feed([t])
    t0 = time.process_time()
    for t in range(300, 300 + args.steps):
        session.feed([t])
    print(f"{(time.process_time() - t0) / args.steps * 1e3:.2f} ms CPU per decode step ({args.threads} threads)")


if __name__ == "__main__":
    main()
