"""Decode speed of lite vs llama.cpp (llama-cpp-python) on the same GGUF, on the CPU.

    python benchmarks/bench_decode.py [--model /tmp/v2lite_shaped.gguf] [--rounds 5] [--tokens 16] [--threads 2]
    python benchmarks/bench_decode.py --profile     # where lite's decode step spends its time (torch.profiler)
    python benchmarks/bench_decode.py --kernels     # native 8-bit kernel vs dequantize-to-bf16 per call, by rows

Both engines load the file once, prefill the same short prompt, then decode the same fixed token ids one at a
time (lite: `Session.feed([t])`; llama.cpp: `Llama.eval([t])`), `--tokens` steps per round. Rounds alternate the
engines so load from other processes hits both alike; each round reports tokens/s, and the summary gives the
median and the spread (min..max) over rounds. lite's effective GB/s is the weight bytes one decode step reads
(every non-expert matrix, plus k experts per MoE layer, in their GGUF form) divided by the time per token.
Numbers from a loaded machine are noisy: the load average is printed before and after.

llama.cpp refuses a GGUF without `tokenizer.ggml.model` (files converted before the converter wrote "none"); for
such a file the script writes a copy with the DeepSeek vocabulary of ../shared (same tensors, same bytes)
next to it as `<name>.vocab.gguf` and benchmarks both engines on that copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # llama_cpp_load

import torch  # noqa: E402

PROMPT = [1, 100, 2000, 345, 17, 9000, 42, 7]
SHARED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "ggml-vocab-deepseek-llm.gguf"


def decode_ids(n: int, vocab: int) -> list[int]:
    """A fixed pseudo-random token sequence (the same for both engines; routing depends on it)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bytes_per_token(path: str) -> tuple[int, int, int]:
    """(weight bytes read per decode token, of which routed experts, experts per token) from the GGUF."""
    from quant.gguf_file import GGUFFile

    f = GGUFFile(path)
    k = int(f.metadata.get("deepseek2.expert_used_count", 0))
    dense = experts = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight":
            dense += t.nbytes // t.shape[0]  # one row is looked up
        elif "_exps." in name:
            experts += t.nbytes // t.shape[0] * k
        else:
            dense += t.nbytes
    return dense + experts, experts, k


def with_vocab(path: str) -> str:
    """`path`, or a copy of it with the ../shared DeepSeek vocabulary when it has none (llama.cpp needs one)."""
    import gguf

    reader = gguf.GGUFReader(path)
    model = reader.fields.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" in reader.fields or (model is not None and model.contents() == "none"):
        return path  # a vocabulary, or "none" (llama.cpp then makes dummy tokens)
    out = Path(path).with_suffix(".vocab.gguf")
    if out.exists() and out.stat().st_mtime > Path(path).stat().st_mtime:
        return str(out)
    if not SHARED_VOCAB.exists():
        sys.exit(f"{path} has no vocabulary and {SHARED_VOCAB} is absent: llama.cpp cannot load it")
    vocab = gguf.GGUFReader(SHARED_VOCAB)
    print(f"{path} has no vocabulary: writing {out} with {SHARED_VOCAB.name}'s", flush=True)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for source, keep in (
        (reader, lambda k: not k.startswith("tokenizer.")),
        (vocab, lambda k: k.startswith("tokenizer.")),
    ):
        for f in source.fields.values():
            if keep(f.name) and not f.name.startswith("GGUF.") and f.name != "general.architecture":
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return str(out)


class LiteEngine:
    name = "lite"

    def __init__(self, path: str, ctx: int):
        import lite

        self.model = lite.load(path, device="cpu")
        self.ctx = ctx

    def start(self, prompt: list[int]) -> None:
        self.session = self.model.session(self.ctx)
        self.session.feed(prompt)

    def step(self, token: int) -> None:
        self.session.feed([token])


class LlamaEngine:
    name = "llama.cpp"

    def __init__(self, path: str, ctx: int, threads: int, extra_bufts: bool = False):
        from llama_cpp_load import load_llama

        # extra (AMX / repacking) buffer types crash in this sandbox: off unless --llama-extra-bufts
        self.llm = load_llama(path, extra_bufts, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, verbose=False)

    def start(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)

    def step(self, token: int) -> None:
        self.llm.eval([token])


def run_round(engine, ids: list[int]) -> float:
    """Tokens per second of one round: prefill PROMPT (untimed), then decode `ids` one at a time."""
    engine.start(PROMPT)
    t0 = time.perf_counter()
    for t in ids:
        engine.step(t)
    return len(ids) / (time.perf_counter() - t0)


def summarize(name: str, rates: list[float]) -> str:
    med = statistics.median(rates)
    return f"{name:10s} median {med:7.2f} tok/s  ({1e3 / med:7.1f} ms/token)  spread {min(rates):.2f}..{max(rates):.2f}"


def alternate(engines: list, rounds: int, measure) -> dict[str, list[float]]:
    """tok/s of `measure(engine)` per round, engines in alternating order (so load hits all alike); prints each
    round, the load average after, and each engine's median and spread."""
    rates: dict[str, list[float]] = {e.name: [] for e in engines}
    for r in range(rounds):
        for e in engines if r % 2 == 0 else engines[::-1]:
            rates[e.name].append(measure(e))
        print(f"round {r + 1}: " + "  ".join(f"{n} {v[-1]:.2f} tok/s" for n, v in rates.items()), flush=True)
    print(f"load average after: {load_avg()}")
    for name, v in rates.items():
        print(summarize(name, v))
    return rates


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if "llama" in args.engines:
        args.model = with_vocab(args.model)
    per_token, expert_bytes, k = bytes_per_token(args.model)
    print(f"model {args.model}: {per_token / 1e6:.1f} MB of weights read per decode token "
          f"({expert_bytes / 1e6:.1f} MB in {k} experts per MoE layer)")  # fmt: skip
    if "llama" in args.engines:
        print(f"llama.cpp extra (AMX / repacked) buffer types: {'on' if args.llama_extra_bufts else 'off'}")
    print(f"threads {args.threads} (torch intra-op / llama.cpp n_threads), {args.tokens} decode steps per round, "
          f"{args.rounds} rounds alternating engines; load average before: {load_avg()}")  # fmt: skip
    engines = []
    if "lite" in args.engines:
        engines.append(LiteEngine(args.model, args.ctx))
        vocab = engines[-1].model.config.vocab_size
    if "llama" in args.engines:
        engines.append(LlamaEngine(args.model, args.ctx, args.threads, args.llama_extra_bufts))
        if "lite" not in args.engines:
            vocab = engines[-1].llm.n_vocab()
    ids = decode_ids(args.tokens, vocab)
    for e in engines:  # warm-up: page the weights in, build caches
        run_round(e, ids[:4])
    rates = alternate(engines, args.rounds, lambda e: run_round(e, ids))
    if "lite" in rates:
        med = statistics.median(rates["lite"])
        print(f"lite effective bandwidth: {per_token * med / 1e9:.2f} GB/s of weights")
    if len(rates) == 2:
        ratio = statistics.median(rates["lite"]) / statistics.median(rates["llama.cpp"])
        print(f"lite / llama.cpp decode speed: {ratio:.2f}x")


def profile(args: argparse.Namespace) -> None:
    """Top ops of lite's decode steps by self CPU time, and the time outside any torch op (Python)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    e = LiteEngine(args.model, args.ctx)
    ids = decode_ids(args.tokens, e.model.config.vocab_size)
    run_round(e, ids[:4])
    wall = 1 / run_round(e, ids)  # without the profiler, which inflates wall time several-fold
    e.start(PROMPT)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in ids:
            e.step(t)
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.top))
    ops = sum(a.self_cpu_time_total for a in avg) / 1e6 / len(ids)
    print(f"per token: wall {wall * 1e3:.2f} ms without the profiler; inside torch ops {ops * 1e3:.2f} ms under it; "
          f"load average {load_avg()}")  # fmt: skip


def kernels(args: argparse.Namespace) -> None:
    """The per-call choice a gguf QMatrix makes: native 8-bit kernel vs dequantize to bf16 + bf16 GEMM."""
    import gguf
    import numpy as np
    import torch.nn.functional as F

    from quant import native
    from quant.formats import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def ms(fn, n: int = 5) -> float:
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(f"threads {args.threads}, load average {load_avg()}; ms per call (median of 5)")
    for qt, n, k in ((Q.Q4_K, 1408, 2048), (Q.Q4_0, 2048, 1408), (Q.Q8_0, 2048, 2048), (Q.Q6_K, 2048, 2048)):
        if qt == Q.Q6_K:  # no quantizer for it here: random blocks with a sane fp16 scale (timing ignores values)
            blocks = rng.integers(0, 256, (n * k // 256, 210), dtype=np.uint8)
            blocks[:, 208:210] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
        else:
            blocks = quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qt)
        raw = native.as_raw(np.ascontiguousarray(blocks))
        for m in args.rows:
            x = torch.randn(m, k)
            a = ms(lambda x=x, raw=raw, qt=qt, n=n, k=k: native.gguf_matmul(x, raw, int(qt), n, k))
            b = ms(lambda x=x, raw=raw, qt=qt, n=n, k=k: F.linear(x.bfloat16(), dequantize(raw, qt, (n, k)).bfloat16()))
            print(f"{qt.name:5s} {n}x{k} rows {m:4d}: native {a:8.2f}  dequantize+bf16 {b:8.2f}"
                  f"  -> {'native' if a <= b else 'dequantize'}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/v2lite_shaped.gguf")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=16, help="decode steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--engines", nargs="+", default=["lite", "llama"], choices=["lite", "llama"])
    p.add_argument("--llama-extra-bufts", action="store_true", help="let llama.cpp use its AMX/repacked weights")
    p.add_argument("--profile", action="store_true", help="profile lite's decode step instead")
    p.add_argument("--top", type=int, default=20, help="rows of the profile table")
    p.add_argument("--kernels", action="store_true", help="time native vs dequantize-to-bf16 per row count")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 192, 256])
    args = p.parse_args()
    if not Path(args.model).exists() and not args.kernels:
        sys.exit(f"no model at {args.model}: make one with benchmarks/make_v2lite_shaped.py")
    profile(args) if args.profile else kernels(args) if args.kernels else bench(args)


if __name__ == "__main__":
    main()
