"""Tokenizer speed: load the DeepSeek vocabulary from GGUF, encode and decode 1 MB of English.

    python benchmarks/bench_tokenizer.py [--vocab ../shared/vocab/ggml-vocab-deepseek-llm.gguf]
                                         [--text ../shared/corpus/tinyshakespeare.txt] [--repeat 3]

Target (issue 3): encoding 1 MB of English in under 1 s. Prints the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from lite.tokenizer import Tokenizer  # noqa: E402


def best_of(repeat: int, fn) -> tuple[float, float, object]:
    """Best wall time, best CPU time (all threads of this process) and the result of `fn` over `repeat` runs."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=Path, default=SHARED / "vocab/ggml-vocab-deepseek-llm.gguf")
    p.add_argument("--text", type=Path, default=SHARED / "corpus/tinyshakespeare.txt")
    p.add_argument("--mb", type=float, default=1.0, help="megabytes of text to encode (default 1)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for f in (args.vocab, args.text):
        if not f.is_file():
            sys.exit(f"missing {f}: this benchmark reads ../shared (the DeepSeek vocabulary and the corpus)")

    load_s, _, tok = best_of(1, lambda: Tokenizer.from_gguf(args.vocab))
    raw = args.text.read_bytes()[: int(args.mb * 1_000_000)]
    text = raw.decode("utf-8", errors="ignore")
    enc_s, enc_cpu, ids = best_of(args.repeat, lambda: tok.encode(text, add_bos=False))
    dec_s, _, back = best_of(args.repeat, lambda: tok.decode(ids))
    assert back == text, "decode(encode(text)) != text"

    def streamed() -> str:
        s = tok.stream()
        return "".join(s.add(i) for i in ids) + s.flush()

    stream_s, _, _ = best_of(1, streamed)
    mb = len(raw) / 1e6
    print(f"vocab load (GGUF -> Tokenizer): {load_s:.2f} s")
    rate = f"{mb / enc_s:.2f} MB/s, {len(ids)} tokens, {len(raw) / len(ids):.2f} bytes/token"
    print(f"encode {mb:.2f} MB: {enc_s:.3f} s wall, {enc_cpu:.3f} s CPU over all threads ({rate})")
    print(f"decode {len(ids)} tokens: {dec_s:.3f} s; streaming decode: {stream_s:.3f} s")
    print("target: encode 1 MB < 1 s:", "met" if enc_s / mb < 1.0 else "NOT met", end="; ")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the machine slows this)")


if __name__ == "__main__":
    main()
