"""How far each CPU prefill path's logits are from float32 math on the file's own (dequantized) weights.

    python benchmarks/prefill_accuracy.py --model /tmp/v2lite_q4km4.tok.gguf [--tokens 384]

Each path runs in its own process (the choices are read when weights load): the reference `LITE_CPU_KERNEL=dense`
(every weight dequantized to float32 once, float32 cache), the int8 and bf16 prefill GEMMs (`LITE_PREFILL_GEMM`),
and the 8-bit decode kernels fed one token at a time (llama.cpp's numerics: 8-bit activations, exact weights).
The prompt is the start of ../shared/corpus/tinyshakespeare.txt, so the file needs a vocabulary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tinyshakespeare.txt"
PATHS = {  # name -> environment
    "dense": {"LITE_CPU_KERNEL": "dense"},
    "int8": {"LITE_PREFILL_GEMM": "int8"},
    "bf16": {"LITE_PREFILL_GEMM": "bf16"},
    "decode": {},
}


def run_one(model: str, tokens: int, name: str, out: str) -> None:
    import torch

    import lite

    torch.set_num_threads(2)
    m = lite.load(model, device="cpu", cache_dtype=torch.float32 if name == "dense" else None)
    ids = m.tokenizer.encode(CORPUS.read_text()[: tokens * 12])[:tokens]
    session = m.session(len(ids) + 8)
    if name == "decode":
        logits = torch.stack([session.feed([t]) for t in ids])
    else:
        logits = session.feed(ids, all_logits=True)
    np.save(out, logits.float().numpy().reshape(len(ids), -1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/v2lite_q4km4.tok.gguf")
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_one(args.model, args.tokens, args.one, args.out)
        return
    if not CORPUS.is_file():
        sys.exit(f"error: {CORPUS} is missing (the shared corpus)")
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for name, env in PATHS.items():
            out = os.path.join(tmp, f"{name}.npy")
            cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens), "--one", name]
            subprocess.run([*cmd, "--out", out], env={**os.environ, **env}, check=True)
            got[name] = np.load(out)
    ref = got.pop("dense")
    print(f"model {args.model}; {ref.shape[0]} tokens; reference: float32 math on the dequantized weights")
    for name, y in got.items():
        rel = np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        top1 = np.mean(y.argmax(-1) == ref.argmax(-1))
        print(f"{name:7s} logits' relative error median {np.median(rel):.2e} (max {rel.max():.2e}); top-1 {top1:.3f}")


if __name__ == "__main__":
    main()
