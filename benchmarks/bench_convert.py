"""Converter throughput (MB/s of input read) and peak memory, on a V2-Lite-shaped checkpoint (or any input).

    python benchmarks/make_v2lite_shaped.py /tmp/v2lite_shaped --layers 4
    python benchmarks/bench_convert.py /tmp/v2lite_shaped -o /tmp/v2lite_shaped.gguf [--recipe q4_k_m] [--experts ..]
    python benchmarks/bench_convert.py --quantize-only [--threads N]   # each quantizer's MB/s of float32 input

Reports wall time, input/output sizes, MB/s, the time spent quantizing and writing, and the process's peak RSS
(`ru_maxrss`, which also counts pages of the memory-mapped input while they are mapped) next to the RSS before
converting (Python + torch). Peak RSS minus that baseline is what conversion itself costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import gguf
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import lite.convert.writer as convert_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, nargs="?", help="HF folder or GGUF")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--recipe")
    ap.add_argument("--outtype")
    ap.add_argument("--experts")
    ap.add_argument("--rest")
    ap.add_argument("--quantize-only", action="store_true", help="time each quantizer on random float32 rows")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quantize_only:
        quantize_only()
        return
    if args.input is None or args.output is None:
        ap.error("INPUT and -o are needed (or --quantize-only)")

    timers = {"quantize": 0.0, "write": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t

        return wrapper

    convert_mod.quantize = timed("quantize", convert_mod.quantize)
    convert_mod._write_chunk = timed("write", convert_mod._write_chunk)
    base_rss = psutil.Process().memory_info().rss
    peak_sampled = [base_rss]

    def progress(p: convert_mod.ConvertProgress) -> None:
        peak_sampled[0] = max(peak_sampled[0], psutil.Process().memory_info().rss)

    s = convert_mod.convert(
        args.input,
        args.output,
        recipe=args.recipe,
        outtype=args.outtype,
        experts=args.experts,
        rest=args.rest,
        force=True,
        progress=progress,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    read_bytes = sum(t.in_bytes for t in s.tensors)
    result = {
        "recipe": s.recipe,
        "threads": torch.get_num_threads(),
        "input_GB": round(s.input_bytes / 1e9, 3),
        "output_GB": round(s.output_bytes / 1e9, 3),
        "seconds": round(s.seconds, 1),
        "MB_per_s": round(read_bytes / 1e6 / s.seconds, 1),
        "quantize_s": round(timers["quantize"], 1),
        "write_s": round(timers["write"], 1),
        "expert_bpw": round(s.expert_bpw or 0, 3),
        "overall_bpw": round(s.overall_bpw, 3),
        "rss_before_MB": round(base_rss / 1e6),
        "peak_rss_MB": round(peak / 1e6),
        "peak_rss_sampled_MB": round(peak_sampled[0] / 1e6),
        "types": s.type_counts,
        "fallbacks": len(s.fallbacks),
    }
    print(json.dumps(result))


def quantize_only(n: int = 1 << 23, rounds: int = 3) -> None:
    """MB/s of float32 input per type (best of `rounds`), on n random weights shaped like expert rows."""
    import numpy as np

    from quant.formats import quantize

    x = torch.from_numpy(np.random.default_rng(0).standard_normal(n, dtype=np.float32).reshape(-1, 2048) * 0.02)
    out = {}
    for name in ("Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"):
        qtype = gguf.GGMLQuantizationType[name]
        quantize(x[:8], qtype)  # build / warm up
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            quantize(x, qtype)
            best = min(best, time.perf_counter() - t)
        out[name] = round(4 * n / 1e6 / best, 1)
    print(json.dumps({"threads": torch.get_num_threads(), "MB_per_s_f32_input": out}))


if __name__ == "__main__":
    main()
