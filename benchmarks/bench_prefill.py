"""Prompt processing (prefill) speed of lite vs llama.cpp on the same GGUF, on the CPU.

    python benchmarks/bench_prefill.py --model /tmp/v2lite_27.gguf [--prompt 512] [--rounds 3] [--threads 2]
    python benchmarks/bench_prefill.py --kernels    # one expert: 8-bit block kernels vs the int8 / bf16 GEMMs, by rows
    python benchmarks/bench_prefill.py --profile    # where lite's prefill spends its time (torch.profiler)

Both engines load the file once and prefill the same fixed pseudo-random prompt of `--prompt` tokens from an
empty cache (lite: `Session.feed(prompt)` on a fresh session; llama.cpp: `Llama.reset()` then `Llama.eval(prompt)`
with n_batch = n_ubatch = the prompt length), alternating engines over rounds after one untimed warm-up round each.
Each round reports prompt tokens per second; the summary gives the median and the spread. llama.cpp's extra
(repacked) CPU buffer types are on unless `--no-llama-extra-bufts`: the build the project notes describe keeps its
repack path (AMX off), which is llama.cpp at its best on this CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_decode import LiteEngine, alternate, decode_ids, load_avg, with_vocab  # noqa: E402


class LlamaPrefill:
    name = "llama.cpp"

    def __init__(self, path: str, ctx: int, threads: int, extra_bufts: bool, batch: int):
        from llama_cpp_load import load_llama

        self.llm = load_llama(path, extra_bufts, n_threads=threads, n_threads_batch=threads, n_ctx=ctx,
                              n_batch=batch, n_ubatch=batch, verbose=False)  # fmt: skip

    def prefill(self, prompt: list[int]) -> None:
        self.llm.reset()  # n_tokens = 0: eval drops every cached position first, an empty cache as lite's
        self.llm.eval(prompt)


class LitePrefill(LiteEngine):
    def prefill(self, prompt: list[int]) -> None:
        self.model.session(self.ctx).feed(prompt)


def timed(engine, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    engine.prefill(prompt)
    return len(prompt) / (time.perf_counter() - t0)


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if "llama" in args.engines:
        args.model = with_vocab(args.model)
    ctx = args.prompt + 16
    engines: list = []
    if "lite" in args.engines:
        engines.append(LitePrefill(args.model, ctx))
        vocab = engines[-1].model.config.vocab_size
    if "llama" in args.engines:
        engines.append(LlamaPrefill(args.model, ctx, args.threads, not args.no_llama_extra_bufts, args.prompt))
        if "lite" not in args.engines:
            vocab = engines[-1].llm.n_vocab()
    prompt = decode_ids(args.prompt, vocab)
    print(f"model {args.model}; prompt {args.prompt} tokens; threads {args.threads}; llama.cpp extra buffer types "
          f"{'off' if args.no_llama_extra_bufts else 'on'}; load average before: {load_avg()}", flush=True)  # fmt: skip
    for e in engines:  # warm-up: pages the weights in, builds caches and kernels
        timed(e, prompt)
    rates = alternate(engines, args.rounds, lambda e: timed(e, prompt))
    if len(rates) == 2:
        ratio = statistics.median(rates["lite"]) / statistics.median(rates["llama.cpp"])
        print(f"lite / llama.cpp prompt speed: {ratio:.2f}x")


def kernels(args: argparse.Namespace) -> None:
    """One V2-Lite expert (gate/up Q4_K 1408x2048, down per --down) by rows: the crossover of quant/prefill.py."""
    import gguf
    import torch.nn.functional as F

    from quant import native, prefill

    Q = gguf.GGMLQuantizationType
    torch.set_num_threads(args.threads)
    hidden, inter = 2048, 1408
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    types = {"gate": Q.Q4_K, "up": Q.Q4_K, "down": Q[args.down]}
    w = {k: (native.quantize(torch.randn(s) * 0.02, int(types[k])).reshape(-1), types[k], s) for k, s in shapes.items()}

    def blocks(x: torch.Tensor) -> torch.Tensor:  # the 8-bit block kernels (decode's)
        mm = {k: (lambda v, k=k: native.gguf_matmul(v, w[k][0], int(w[k][1]), *w[k][2])) for k in w}
        return mm["down"](F.silu(mm["gate"](x)) * mm["up"](x))

    def gemm(kind: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            os.environ["LITE_PREFILL_GEMM"] = kind
            return prefill.swiglu(x, w["gate"], w["up"], w["down"])

        return run

    def cpu_ms(fn, x: torch.Tensor) -> float:  # CPU time: stable on a shared machine at 1 thread
        fn(x)
        t0 = time.process_time()
        for _ in range(10):
            fn(x)
        return (time.process_time() - t0) * 100

    def ms(fn, x: torch.Tensor) -> float:
        fn(x)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(f"threads {args.threads}, load average {load_avg()}; one expert (gate/up Q4_K, down {args.down}), ms")
    kinds = ["int8", "bf16"] if prefill._vnni() else ["bf16"]
    for m in args.rows:
        x = torch.randn(m, hidden)
        a = ms(blocks, x)
        gemms = "  ".join(f"{k} GEMM {ms(gemm(k), x):8.2f}" for k in kinds)
        print(f"rows {m:4d}: 8-bit kernels {a:8.2f}  {gemms}", flush=True)
    if not prefill._vnni():
        return
    print("one 2048x2048 weight, CPU ms: 8-bit kernel / int8 GEMM (prefill.INT8_FROM_ROWS)")
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q4_0):
        raw = native.quantize(torch.randn(2048, 2048) * 0.02, int(qtype)).reshape(-1)
        cells = []
        for m in (4, 6, 8, 10, 12, 14, 16):
            x = torch.randn(m, 2048)
            a = cpu_ms(lambda v, r=raw, t=qtype: native.gguf_matmul(v, r, int(t), 2048, 2048), x)
            b = cpu_ms(lambda v, r=raw, t=qtype: prefill.int8_linear(prefill.quantize_acts(v), r, t, (2048, 2048)), x)
            cells.append(f"{m}: {a:.2f}/{b:.2f}")
        print(f"{qtype.name:5s} " + "  ".join(cells), flush=True)


def profile(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    e = LitePrefill(args.model, args.prompt + 16)
    prompt = decode_ids(args.prompt, e.model.config.vocab_size)
    timed(e, prompt)
    print(f"prefill without the profiler: {timed(e, prompt):.2f} tok/s")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        e.prefill(prompt)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/v2lite_shaped.gguf")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", nargs="+", default=["lite", "llama"], choices=["lite", "llama"])
    p.add_argument("--no-llama-extra-bufts", action="store_true", help="llama.cpp without its repacked weights")
    p.add_argument("--kernels", action="store_true", help="one expert by rows: 8-bit kernels vs the int8 / bf16 GEMMs")
    p.add_argument("--down", default="Q4_0", help="the expert's down type for --kernels (Q4_0, Q8_0, Q6_K, Q4_K)")
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32, 48, 96, 192])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    kernels(args) if args.kernels else profile(args) if args.profile else bench(args)


if __name__ == "__main__":
    main()
