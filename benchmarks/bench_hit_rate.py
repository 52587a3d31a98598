"""Effective expert-cache hit rate on trained routing: decode through held-out text with the real engine.

    python benchmarks/bench_hit_rate.py [MODEL.gguf] [--tokens 1000] [--prompt 64] [--slots 1k,2k,3k] [--trace F]

Teacher-forced decode (one token per forward, so routing is exactly what generating this text would see) over
the end of ../shared/corpus/tinyshakespeare.txt (the demo model's held-out split), in windows of the model's
context, each after a --prompt-token prefill whose counters are not kept. For each cache size (slots per MoE
layer; "2k" = twice the routed experts per token) and prefetch setting, the engine's own counters
(experts_on="ram", miss_policy="fetch"; the CPU device tier, or --device cuda) give:
- hit_rate: needed experts already in the device tier when the layer ran;
- effective_hit_rate: the same, less hits whose prefetch copy was still in flight (resident or in time);
- prefetch precision and recall.
The run's routing trace is also replayed through benchmarks/cache_sim.py (LRU, LFU, Belady) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CORPUS = ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt"


def held_out_tokens(tokenizer, n: int) -> list[int]:
    text = CORPUS.read_text()
    return tokenizer.encode(text[-max(40 * n, 20_000) :])[-n:]  # the end of the corpus: the demo's val split


def decode_through(model, tokens: list[int], prompt: int, trace: Path | None = None) -> dict:
    """Windows of the model's context: prefill `prompt` tokens (not counted), then feed the rest one at a time.
    Returns the engine's counters summed over the decode steps, with the rates."""
    from offload.stats import COUNTERS, with_rates
    from offload.trace import TraceRecorder

    window = model.max_context - prompt
    sums = dict.fromkeys(COUNTERS, 0.0)
    rec = TraceRecorder(trace) if trace is not None else None
    for a in range(prompt, len(tokens), window):
        s = model.session(prompt + window)
        s.feed(tokens[a - prompt : a])
        before = model.stats()["total"]
        with rec.attached(model) if rec else contextlib.nullcontext():
            for t in tokens[a : a + window]:
                s.feed([t])
        after = model.stats()["total"]
        for key in COUNTERS:
            sums[key] += after[key] - before[key]
    if rec:
        rec.close()
    return with_rates(sums)


def slots_of(spec: str, k: int) -> int:
    return int(spec[:-1]) * k if spec.endswith("k") else int(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "lite" / "data" / "demo.gguf"))
    ap.add_argument("--tokens", type=int, default=1000, help="decode steps")
    ap.add_argument("--prompt", type=int, default=64, help="prefill tokens before counting")
    ap.add_argument("--slots", default="1k,2k,3k", help="cache sizes per MoE layer: N or Nk (N x top-k)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: real copies on a copy stream, so late hits count")
    ap.add_argument("--trace", default=None, help="keep the routing trace (prefetch 1, first size) here")
    args = ap.parse_args(argv)
    if not CORPUS.is_file():
        print(f"needs {CORPUS} (the shared corpus)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import lite
    from offload.sim import report
    from offload.trace import read_trace

    probe = lite.load(args.model, device=args.device, experts_on="device")
    k = probe.config.num_experts_per_tok
    tokens = held_out_tokens(probe.tokenizer, args.prompt + args.tokens)
    del probe
    out: dict = {"model": args.model, "top_k": k, "decode_tokens": len(tokens) - args.prompt, "engine": {}}
    keys = ("hit_rate", "effective_hit_rate", "prefetch_precision", "prefetch_recall", "prefetches_issued", "stall_s")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(args.trace or Path(tmp) / "trace.jsonl")
        trace.unlink(missing_ok=True)
        for spec in args.slots.split(","):
            slots = slots_of(spec, k)
            for prefetch in (False, 1, 2):
                m = lite.load(args.model, device=args.device, experts_on="ram", expert_cache=slots, prefetch=prefetch,
                              miss_policy="fetch")  # fmt: skip
                record = trace if (prefetch == 1 and not trace.exists()) else None
                tot = decode_through(m, tokens, args.prompt, record)
                m.experts.close()
                out["engine"][f"{slots} slots, prefetch {prefetch}"] = {key: tot[key] for key in keys}
        _, calls = read_trace(trace)
        sizes = sorted({slots_of(s, k) for s in args.slots.split(",")})
        rep = report(calls, sizes)
        sizes = {n: {p: (r[p]["hit_rate"] if p == "prefetch" else r[p]) for p in r} for n, r in rep["sizes"].items()}
        out["trace"] = {"prediction_accuracy_top_k": rep["prediction_accuracy"], "sizes": sizes}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
