"""Native GGUF block kernels vs torch: µs per matmul and effective GB/s of weight bytes read.

    python benchmarks/bench_native.py [--rounds 15] [--threads 1 2] [--m 1 16] [--big] [--only-moe] [--min CALLS]

Shapes are DeepSeek-V2-Lite's: an expert's gate/up (1408x2048, Q4_K) and down (2048x1408, Q4_0), an
attention/shared-expert matrix (2048x2048, Q8_0) and, with --big, the output head (102400x2048, Q8_0).
Candidates run interleaved, round after round, and each reports its median, so load from other processes
hits all of them alike. GB/s counts the bytes of the weight in the candidate's own format.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import gguf
import numpy as np
import torch

from quant import native

T = gguf.GGMLQuantizationType
SCALE_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2]}


def random_blocks(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF blocks [n, row_bytes] with sane fp16 scales (the timing doesn't depend on values)."""
    bs, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // bs, nbytes), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        raw[:, :, off : off + 2] = rng.uniform(1e-3, 2e-2, size=(n, k // bs, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def int4pack(w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """torch's CPU int4 kernel on a group-32 quantization of w (N, K): (matmul fn, bytes)."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = lo + 8 * scale  # torch's int4 dequant is (q - 8) * scale + zero
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/32, N, 2]
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)), packed.numel() + sz.numel() * 2


MIN_OF_CALLS = 0  # > 0: report the fastest single call of this many (see --min)


def timed(fn: Callable[[], object], min_s: float = 0.02) -> float:
    """Seconds per call: the mean over calls filling min_s, or the fastest of MIN_OF_CALLS single calls."""
    fn()
    if MIN_OF_CALLS:
        best = float("inf")
        for _ in range(MIN_OF_CALLS):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def bench_shape(name: str, qtype: T, n: int, k: int, ms: list[int], threads: list[int], rounds: int) -> None:
    rng = np.random.default_rng(0)
    raw_np = random_blocks(qtype, n, k, rng)
    raw = native.as_raw(raw_np)
    w = torch.from_numpy(gguf.quants.dequantize(raw_np, qtype))
    w_bf16 = w.to(torch.bfloat16)
    i4_fn, i4_bytes = int4pack(w)
    for m in ms:
        x = torch.randn(m, k)
        xb = x.to(torch.bfloat16)
        cands: dict[str, tuple[Callable[[], object], int]] = {
            f"native {qtype.name}": (lambda x=x: native.gguf_matmul(x, raw, int(qtype), n, k), raw.numel()),
            "torch int4pack": (lambda xb=xb: i4_fn(xb), i4_bytes),
            "torch bf16 matmul": (lambda xb=xb: xb @ w_bf16.T, w_bf16.numel() * 2),
            "torch f32 matmul": (lambda x=x: x @ w.T, w.numel() * 4),
        }
        for t in threads:
            torch.set_num_threads(t)
            times: dict[str, list[float]] = {c: [] for c in cands}
            for _ in range(rounds):
                for c, (fn, _) in cands.items():
                    times[c].append(timed(fn))
            for c, (_, nbytes) in cands.items():
                s = statistics.median(times[c])
                print(f"| {name} | {m} | {t} | {c} | {s * 1e6:9.1f} | {nbytes / s / 1e9:6.1f} |", flush=True)


def bench_moe(threads: list[int], rounds: int, k: int = 6, hidden: int = 2048, inter: int = 1408) -> None:
    """One decode token through k V2-Lite experts: fused moe_ffn vs chaining gguf_matmul from Python."""
    rng = np.random.default_rng(1)
    gate = [native.as_raw(random_blocks(T.Q4_K, inter, hidden, rng)) for _ in range(k)]
    up = [native.as_raw(random_blocks(T.Q4_K, inter, hidden, rng)) for _ in range(k)]
    down = [native.as_raw(random_blocks(T.Q4_0, hidden, inter, rng)) for _ in range(k)]
    nbytes = sum(t.numel() for t in gate + up + down)
    x, w = torch.randn(hidden), torch.rand(k)
    qt = (int(T.Q4_K), int(T.Q4_K), int(T.Q4_0))

    def chained() -> torch.Tensor:
        y = torch.zeros(hidden)
        for e in range(k):
            g = native.gguf_matmul(x[None], gate[e], qt[0], inter, hidden)
            h = torch.nn.functional.silu(g) * native.gguf_matmul(x[None], up[e], qt[1], inter, hidden)
            y += w[e] * native.gguf_matmul(h, down[e], qt[2], hidden, inter)[0]
        return y

    cands = {"moe_ffn (fused)": lambda: native.moe_ffn(x, gate, up, down, w, qt, inter), "chained gguf_matmul": chained}
    for t in threads:
        torch.set_num_threads(t)
        times: dict[str, list[float]] = {c: [] for c in cands}
        for _ in range(rounds):
            for c, fn in cands.items():
                times[c].append(timed(fn))
        for c in cands:
            s = statistics.median(times[c])
            print(f"| {k} experts Q4_K/Q4_0 | 1 | {t} | {c} | {s * 1e6:9.1f} | {nbytes / s / 1e9:6.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--big", action="store_true", help="also the 102400x2048 output head")
    ap.add_argument("--only-moe", action="store_true", help="only the fused-expert comparison")
    ap.add_argument(
        "--min",
        type=int,
        default=0,
        metavar="CALLS",
        help="report the fastest of CALLS single calls: on a shared, loaded machine this approximates idle speed",
    )
    args = ap.parse_args()
    global MIN_OF_CALLS
    MIN_OF_CALLS = args.min
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.build_error()}")
    print(f"native ISA: {native.best_isa()}, torch {torch.__version__}")
    print("| weight (N x K) | M | threads | kernel | µs | GB/s |\n|---|---|---|---|---|---|")
    shapes = [("1408x2048", T.Q4_K, 1408, 2048), ("2048x1408", T.Q4_0, 2048, 1408), ("2048x2048", T.Q8_0, 2048, 2048)]
    if args.big:
        shapes.append(("102400x2048", T.Q8_0, 102400, 2048))
    if not args.only_moe:
        for name, qtype, n, k in shapes:
            bench_shape(name, qtype, n, k, args.m, args.threads, args.rounds)
    bench_moe(args.threads, args.rounds)


if __name__ == "__main__":
    main()
