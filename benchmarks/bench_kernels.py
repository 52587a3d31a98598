"""Expert-matmul kernels on DeepSeek-V2-Lite shapes: packed int4 (torch int4pack) vs the alternatives.

    python benchmarks/bench_kernels.py                 # CPU, 1 and 2 threads, batch 1 and 16
    python benchmarks/bench_kernels.py --native        # also quant.native (GGUF-block kernels), if it builds
    python benchmarks/bench_kernels.py --device cuda   # the CUDA kernels
    python benchmarks/bench_kernels.py --quantize-only # converter side: quantize MB/s

Prints µs per call (median of alternating rounds) and effective GB/s = bytes of weight the method reads per call
/ time. Random weights: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from quant.formats import dequantize, quantize
from quant.qmatrix import QMatrix

Q = gguf.GGMLQuantizationType


def timeit(fns: dict[str, Callable[[], object]], rounds: int, per_round: int, sync: Callable[[], None]) -> dict:
    """Median µs per call of each fn; rounds alternate between fns so that machine noise hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm up
        for _ in range(3):
            f()
    sync()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(per_round):
                f()
            sync()
            samples[k].append((time.perf_counter() - t) / per_round * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def weight(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    return quantize(w, qtype)


def cases(device: str, native: bool) -> list[tuple[str, int, dict[str, tuple[Callable, int]], int]]:
    """(label, in_features, {method: (fn(x), bytes read per call)}, out) for each weight shape."""
    out = []
    shapes = [("gate/up Q4_K 1408x2048", Q.Q4_K, 1408, 2048), ("down Q4_0 2048x1408", Q.Q4_0, 2048, 1408)]
    for label, qtype, n, k in shapes:
        raw = weight(qtype, n, k, seed=n)
        qm = QMatrix.from_gguf(raw, qtype, (n, k), device=device)
        w32 = dequantize(raw, qtype, (n, k)).to(device)
        w16 = w32.bfloat16()
        raw_t = torch.from_numpy(raw.reshape(-1)).to(device)
        m: dict[str, tuple[Callable, int]] = {
            "int4pack bf16 (QMatrix)": (lambda x, qm=qm: qm(x), qm.nbytes),
            "dequantize+matmul f32": (
                lambda x, r=raw_t, t=qtype, s=(n, k): F.linear(x, dequantize(r, t, s)),
                raw.nbytes,
            ),
            "dense bf16 weight": (lambda x, w=w16: F.linear(x.bfloat16(), w).float(), w16.nbytes),
            "dense f32 weight": (lambda x, w=w32: F.linear(x, w), w32.nbytes),
        }
        if native and device == "cpu":
            from quant import native as nat

            if nat.available():
                m["native GGUF blocks (q8 acts)"] = (
                    lambda x, r=raw_t, t=int(qtype), n=n, k=k: nat.gguf_matmul(x, r, t, n, k),
                    raw.nbytes,
                )
        out.append((label, k, m, n))
    # fused gate+up: one call for both matrices
    raws = [weight(Q.Q4_K, 1408, 2048, seed=s) for s in (1, 2)]
    parts = [QMatrix.from_gguf(r, Q.Q4_K, (1408, 2048), device=device) for r in raws]
    fused = QMatrix.cat(parts)
    out.append(
        (
            "gate+up Q4_K 2x 1408x2048",
            2048,
            {
                "int4pack, 2 calls": (lambda x: (parts[0](x), parts[1](x)), 2 * parts[0].nbytes),
                "int4pack, fused 2816x2048": (lambda x: fused(x), fused.nbytes),
            },
            2816,
        )
    )
    # attention-sized Q8_0 weight: kept dense (bf16 vs f32)
    raw = weight(Q.Q8_0, 2048, 2048, seed=3)
    w32 = dequantize(raw, Q.Q8_0, (2048, 2048)).to(device)
    q32 = QMatrix.from_float(w32, device, torch.float32)
    q16 = QMatrix.from_float(w32, device, torch.bfloat16)
    out.append(
        (
            "Q8_0 2048x2048 (dense)",
            2048,
            {"f32 weight": (lambda x: q32(x), q32.nbytes), "bf16 weight": (lambda x: q16(x), q16.nbytes)},
            2048,
        )
    )
    return out


def overhead(device: str) -> dict[str, float]:
    """Per-call cost of tiny matmuls: the Python + dispatch floor under every expert call."""
    raw = weight(Q.Q4_K, 16, 256, seed=5)
    qm = QMatrix.from_gguf(raw, Q.Q4_K, (16, 256), device=device)
    x = torch.randn(1, 256, device=device)
    xb = x.bfloat16()
    p, sz = qm.tensors["packed"], qm.tensors["scales_zeros"]
    op = qm._mm
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    w = torch.randn(16, 256, device=device)
    return timeit(
        {
            "QMatrix 16x256 Q4_K": lambda: qm(x),
            "QMatrix bf16 x (no casts)": lambda: qm(xb),
            "raw int4 op 16x256": lambda: op(xb, p, 32, sz),
            "F.linear f32 16x256": lambda: F.linear(x, w),
        },
        rounds=15,
        per_round=200,
        sync=sync,
    )


def load_times() -> dict[str, float]:
    """ms to build one expert matrix from GGUF bytes (paid per expert at load, or per RAM-tier fill)."""
    out = {}
    for qtype, n, k in [(Q.Q4_K, 1408, 2048), (Q.Q4_0, 2048, 1408), (Q.Q8_0, 1408, 2048)]:
        raw = weight(qtype, n, k, seed=7)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            QMatrix.from_gguf(raw, qtype, (n, k))
            times.append(time.perf_counter() - t)
        out[f"from_gguf {qtype.name} {n}x{k}"] = min(times) * 1e3
    return out


def quantize_rates() -> dict[str, float]:
    """Converter-side throughput: MB/s of float32 input quantized (one 1408x2048 expert matrix)."""
    x = np.random.default_rng(0).standard_normal((1408, 2048)).astype(np.float32) * 0.02
    out = {}
    for qtype in (Q.Q4_K, Q.Q4_0, Q.Q8_0, Q.BF16, Q.F16):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            quantize(x, qtype)
            times.append(time.perf_counter() - t)
        out[qtype.name] = x.nbytes / min(times) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--native", action="store_true", help="include quant.native (builds the extension)")
    ap.add_argument("--quantize-only", action="store_true", help="only the converter's quantize throughput")
    args = ap.parse_args()
    if args.quantize_only:
        for name, rate in quantize_rates().items():
            print(f"quantize {name:<5} {rate:7.1f} MB/s of float32 input")
        return
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    all_cases = cases(args.device, args.native)
    print(f"torch {torch.__version__}, device {args.device}; µs per call (median), effective GB/s of weight read")
    for th in threads:
        torch.set_num_threads(th)
        for label, k, methods, _ in all_cases:
            for b in (int(s) for s in args.batches.split(",")):
                x = torch.randn(b, k, device=args.device)
                per_round = 20 if b == 1 else 5
                slow = {m for m in methods if "f32" in m and "dequantize" in m}
                fns = {m: (lambda f=f, x=x: f(x)) for m, (f, _) in methods.items() if m not in slow}
                res = timeit(fns, args.rounds, per_round, sync)
                for m in slow:  # dequantize-per-call is ~100x slower: fewer samples
                    res |= timeit({m: lambda f=methods[m][0], x=x: f(x)}, 3, 2, sync)
                for m, us in res.items():
                    gbs = methods[m][1] / us / 1e3
                    print(f"threads={th} batch={b:<3} {label:<26} {m:<30} {us:9.1f} µs {gbs:6.1f} GB/s")
    for th in threads:
        torch.set_num_threads(th)
        for m, us in overhead(args.device).items():
            print(f"threads={th} overhead {m:<24} {us:7.1f} µs/call")
        if args.device == "cpu":
            for m, ms in load_times().items():
                print(f"threads={th} load {m:<28} {ms:7.1f} ms (min of 5)")


if __name__ == "__main__":
    main()
