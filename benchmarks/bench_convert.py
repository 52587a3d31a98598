"""Converter throughput (MB/s of safetensors read) and peak memory, on a V2-Lite-shaped checkpoint.

    python benchmarks/make_v2lite_shaped.py /tmp/v2lite_shaped --layers 4
    python benchmarks/bench_convert.py /tmp/v2lite_shaped -o /tmp/v2lite_shaped.gguf [--experts q4_k] [--rest q8_0]

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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import lite.convert as convert_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--outtype")
    ap.add_argument("--experts")
    ap.add_argument("--rest")
    args = ap.parse_args()

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

    def progress(done: int, total: int, name: str) -> None:
        peak_sampled[0] = max(peak_sampled[0], psutil.Process().memory_info().rss)

    s = convert_mod.convert(
        args.hf_dir,
        args.output,
        outtype=args.outtype,
        experts=args.experts,
        rest=args.rest,
        force=True,
        progress=progress,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    read_bytes = sum(t.in_bytes for t in s.tensors)
    result = {
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


if __name__ == "__main__":
    main()
