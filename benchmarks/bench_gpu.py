"""GPU benchmarks of the GGUF-block device path (run by benchmarks/gpu_check.sh on a lent GPU machine).

    python benchmarks/bench_gpu.py kernels                     # Triton kernel GB/s per type vs the device's copy rate
    python benchmarks/bench_gpu.py model --layers 4            # a V2-Lite-shaped Q4_K_M file of random blocks:
                                                               # resident, and experts in RAM behind a 2.5 GiB cache

`model` writes the file (community Q4_K_M types per tensor, as tests/full_size_gguf.py lays them out) with random
valid blocks: random bytes (every block its own), every f16 scale 2^-10 and the offset terms set to centre the
weights. It then measures decode
tok/s, prefill tok/s of a 4K-token prompt, the effective hit rate, bytes_h2d, host syncs per decoded token (torch's
sync debug mode counts them), peak VRAM and peak RSS. `--tiny` runs the same code on the tiny test shapes (on the
CPU under TRITON_INTERPRET=1 + LITE_DEVICE_KERNELS=triton: a check that the script itself works).
Each figure is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

Q = gguf.GGMLQuantizationType
# (byte offset, value) of the f16 fields in one block of each type: a scale of 2^-10, and for the types with an
# offset (min) term a value that centres the weights on zero, as trained weights are (an uncentred random weight
# adds one common direction to every token's hidden state, and the routing collapses onto a few experts)
D = 2.0**-10
F16_FIELDS = {
    Q.Q8_0: ((0, D),), Q.Q4_0: ((0, D),), Q.Q5_0: ((0, D),), Q.Q6_K: ((208, D),),
    Q.Q4_1: ((0, D), (2, -7.5 * D)),  # w = d q + m, q in 0..15
    Q.Q4_K: ((0, D), (2, 7.5 * D)),  # w = d sc q - dmin m, sc and m random 6-bit: centred on average
    Q.Q5_K: ((0, D), (2, 15.5 * D)),
    Q.Q5_1: ((0, D), (2, -15.5 * D)),  # w = d q + m, q in 0..31
    Q.Q2_K: ((80, D), (82, 1.5 * D)),  # w = d sc q - dmin m, sc and m random 4-bit, q in 0..3
    Q.Q3_K: ((108, D),), Q.IQ4_NL: ((0, D),), Q.IQ4_XS: ((0, D),),  # signed levels and scales: about centred
}  # fmt: skip


def random_blocks(qtype: Q, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """`nbytes` of valid `qtype` blocks: random bytes, f16 scales set to a small constant."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        n = nbytes // {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[qtype]
        x = (rng.standard_normal(min(n, 1 << 20)) * 0.02).astype(np.float32)
        vals = {Q.F32: x, Q.F16: x.astype(np.float16), Q.BF16: (x.view(np.uint32) >> 16).astype(np.uint16)}[qtype]
        return np.resize(vals.view(np.uint8), nbytes)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    # every block its own random bytes: a tiled pattern makes experts repeat and the routing collapse onto a few
    blocks = rng.integers(0, 256, size=(nbytes // size, size), dtype=np.uint8)
    for off, value in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return blocks.reshape(-1)


def write_random_gguf(path: Path, layers: int, tiny: bool = False) -> Path:
    """A V2-Lite-shaped Q4_K_M GGUF of `layers` layers (or the tiny test shape) filled with random blocks."""
    from full_size_gguf import CONFIGS, MOSTLY_Q4_K_M, tensor_types

    from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf

    if tiny:
        from tiny_models import CONFIGS as TINY

        cfg = {**TINY["lite"], "num_hidden_layers": layers, "rope_scaling": None, "rope_parameters": None}
    else:
        cfg = {**CONFIGS["lite"], "num_hidden_layers": layers}
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_file_type(MOSTLY_Q4_K_M)
    add_metadata(w, gguf_metadata_from_hf(cfg))
    types = tensor_types(cfg)
    for name, (qtype, shape, size) in types.items():
        if name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight"):
            qtype = Q.F32  # norms ~1, routers random: realistic routing
        w.add_tensor_info(name, shape, np.dtype(np.float32), size if qtype != Q.F32 else 4 * int(np.prod(shape)),
                          raw_dtype=qtype)  # fmt: skip
        types[name] = (qtype, shape, size if qtype != Q.F32 else 4 * int(np.prod(shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, (qtype, shape, size) in types.items():
        if name.endswith("_norm.weight"):
            data = np.ones(int(np.prod(shape)), dtype=np.float32).view(np.uint8)
        else:
            data = random_blocks(qtype, size, rng)
        w.write_tensor_data(data)
    w.close()
    return path


def timed(fn, sync, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def bench_kernels(device: str, tiny: bool) -> None:
    from quant import device_kernels
    from quant.formats import nbytes

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, k, reps = (64, 256, 1) if tiny else (8192, 4096, 50)
    rng = np.random.default_rng(0)
    for qtype in device_kernels.SUPPORTED_QTYPES:
        size = nbytes((n, k), qtype)
        raw = torch.from_numpy(random_blocks(qtype, size, rng)).to(device)
        copy_s = timed(lambda raw=raw: raw.clone(), sync, reps)  # read + write: 2 x size bytes
        for m in (1, 8, 512):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            s = timed(lambda x=x, raw=raw, q=qtype: device_kernels.gguf_matmul(x, raw, q, n, k), sync, reps)
            print(json.dumps({"kernel": qtype.name, "M": m, "N": n, "K": k, "us": round(s * 1e6, 1),
                              "weight_GBps": round(size / s / 1e9, 1), "copy_GBps": round(2 * size / copy_s / 1e9, 1),
                              "TFLOPs": round(2 * m * n * k / s / 1e12, 2)}), flush=True)  # fmt: skip


def count_syncs(fn) -> int:
    """Device-to-host synchronisations during fn() (CUDA's sync debug mode warns once per sync)."""
    if not torch.cuda.is_available():
        fn()
        return -1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_model(device: str, layers: int, cache: str, prompt: int, decode: int, tiny: bool) -> None:
    import lite

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = write_random_gguf(Path(d) / "v2lite-random.gguf", layers, tiny)
        print(json.dumps({"wrote": path.name, "GB": round(path.stat().st_size / 1e9, 2),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
        for label, opts in (("resident", {"experts_on": "device"}),
                            ("ram+cache", {"experts_on": "ram", "expert_cache": cache}),
                            ("ram+cache, prefetch fills every slot",
                             {"experts_on": "ram", "expert_cache": cache, "prefetch_width": 64})):  # fmt: skip
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model = lite.load(str(path), device=device, **opts)
            vocab = model.config.vocab_size
            ids = torch.randint(0, vocab, (prompt + decode + 8,), generator=torch.Generator().manual_seed(1)).tolist()
            s = model.session(prompt + decode + 8)
            s.feed(ids[:prompt])  # warm-up: Triton compiles each kernel variant on first use (prefill and decode)
            for t in ids[prompt : prompt + 3]:
                s.feed([t])
            sync()
            s.reset()
            model.reset_stats()
            t0 = time.perf_counter()
            s.feed(ids[:prompt])
            sync()
            pp = prompt / (time.perf_counter() - t0)
            prefill = model.stats().get("total", {})
            model.reset_stats()
            t0 = time.perf_counter()
            for t in ids[prompt : prompt + decode]:
                s.feed([t])
            sync()
            tg = decode / (time.perf_counter() - t0)
            total = model.stats().get("total", {})
            syncs = count_syncs(lambda s=s, t=ids[-1]: s.feed([t])) if device == "cuda" else -1
            print(json.dumps({
                "model": label, "layers": layers, "prefill_tokens": prompt, "pp_tok_s": round(pp, 1),
                "tg_tok_s": round(tg, 2), "effective_hit_rate": total.get("effective_hit_rate"),
                "hit_rate": total.get("hit_rate"), "prefill_bytes_h2d": prefill.get("bytes_h2d"),
                "decode_bytes_h2d_per_token": (total.get("bytes_h2d") or 0) / decode,
                "host_syncs_per_token": syncs, "slots_per_layer": model.stats().get("slots_per_layer"),
                "peak_vram_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            }), flush=True)  # fmt: skip
            del model, s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "model"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cache", default="2.5GiB", help="expert cache of the RAM-tier run (slots or bytes)")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: check the script on the CPU (interpreted)")
    a = p.parse_args()
    if a.what == "kernels":
        bench_kernels(a.device, a.tiny)
    else:
        cache: int | str = int(a.cache) if a.cache.isdigit() else a.cache
        bench_model(a.device, a.layers, cache, a.prompt, a.decode, a.tiny)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
