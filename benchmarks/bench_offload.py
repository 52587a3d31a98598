"""Offload benchmarks.

    python benchmarks/bench_offload.py [MODEL.gguf] [--tokens N]        # CPU: disk-tier and overhead ratios
    python benchmarks/bench_offload.py --device cuda --overhead-only   # the overhead ratio on the GPU
    python benchmarks/bench_offload.py --cuda [--layers L]               # CUDA: expert copy and MoE decode step

CPU mode (default model: lite/data/demo.gguf), decode tokens/s after a 16-token prompt (medians, and the median
of the per-round ratios):
- overhead: every expert resident in the engine (experts_on="device") vs `ResidentExperts` (no machinery), the
  two alternated --rounds times on one loaded model;
- disk tier: experts_on="disk" with a RAM budget of 25% of the expert bytes vs experts_on="ram", both with
  a device cache of 2x the active experts per layer, each in its own process (alternated --rounds/2 times) that
  starts with the GGUF out of the page cache and reads around it (--hot-disk: through the page cache).
CUDA mode: host->device copy of one V2-Lite-shaped Q4_K expert (1408x2048 gate/up, 2048x1408 down; 4.87 MB in
the GGUF, 5.4 MB as int4pack) from pinned and from pageable RAM; one expert on the CPU at batch 1; and one
MoE layer decode step (top-6 of 64) with every expert resident, all hits, all misses fetched, all misses on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


CLOCK = time.perf_counter  # --cpu-time: process CPU seconds instead (steadier on a shared machine)


def decode_tps(model, tokens: int, reps: int = 3) -> float:
    rates = []
    for rep in range(reps + 1):  # the first run is a warm-up
        if rep == 1:
            model.reset_stats()
        s = model.session(16 + tokens + 1)
        tok = int(torch.argmax(s.feed(list(range(2, 18)))))
        t0 = CLOCK()
        for _ in range(tokens):
            tok = int(torch.argmax(s.feed([tok])))
        if rep:
            rates.append(tokens / (CLOCK() - t0))
    return statistics.median(rates)


def alternate(model, backends: dict, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Decode tokens/s of each backend on the same model, alternated `rounds` times so that drifting machine load
    hits them all alike."""
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, backend in backends.items():
            model.transformer.experts = model.experts = backend
            rates[name].append(decode_tps(model, tokens, reps=1))
    return rates


def overhead_mode(path: str, tokens: int, rounds: int = 7, device: str = "cpu") -> dict:
    """The overhead ratio: the engine with every expert resident vs `ResidentExperts`, alternated in-process."""
    import lite
    from offload.resident import ResidentExperts

    out: dict = {"model": path, "device": device, "threads": torch.get_num_threads(), "clock": CLOCK.__name__,
                 "rounds": rounds}  # fmt: skip
    m = lite.load(path, device=device, experts_on="device")
    engine = m.experts
    resident = ResidentExperts(engine.stacks, m.device, m.dtype)
    rates = alternate(m, {"engine": engine, "resident": resident}, tokens, rounds)
    out["engine_all_resident_tps"] = statistics.median(rates["engine"])
    out["resident_experts_tps"] = statistics.median(rates["resident"])
    out["overhead_ratio"] = statistics.median(e / r for e, r in zip(rates["engine"], rates["resident"]))
    out["overhead_ratio_range"] = (min(rates["engine"]) / max(rates["resident"]),
                                   max(rates["engine"]) / min(rates["resident"]))  # fmt: skip
    return out


def tier_child(path: str, tier: str, tokens: int, hot: bool) -> dict:
    """One process, one tier: decode tokens/s with 2x k device slots; the disk tier gets 25% of the expert bytes
    as RAM and (unless `hot`) starts with the file out of the page cache and reads around it."""
    import os

    import lite
    from offload.planner import plan_file

    if not hot:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing maps the file yet: this drops its pages
        os.close(fd)
    _, sizes = plan_file(path, device="cpu")
    slots, ctx = 2 * sizes.experts_per_token, 16 + tokens + 1
    opts = {"experts_on": tier, "expert_cache": slots, "miss_policy": "auto", "ctx": ctx}
    if tier == "disk":  # on the CPU one RAM budget holds the latent cache, the slots and the LRU (25% of experts)
        slot_bytes = slots * sum(sizes.expert_bytes_by_layer.values())
        ram = sizes.expert_total // 4 + slot_bytes + sizes.latent_bytes(ctx, 4)
        opts.update(ram_memory=ram, drop_page_cache=not hot)
    m = lite.load(path, device="cpu", **opts)
    tps = decode_tps(m, tokens)
    return {"tier": tier, "tps": tps, "stats": m.stats()["total"]}


def tiers_mode(path: str, tokens: int, rounds: int, hot: bool, threads: int | None) -> dict:
    """The disk-tier ratio: RAM-tier and disk-tier processes alternated `rounds` times."""
    import subprocess

    rates: dict[str, list[float]] = {"ram": [], "disk": []}
    last: dict[str, dict] = {}
    for _ in range(rounds):
        for tier in ("ram", "disk"):
            cmd = [sys.executable, __file__, path, "--tier-child", tier, "--tokens", str(tokens)]
            cmd += (["--hot-disk"] if hot else []) + (["--threads", str(threads)] if threads else [])
            rec = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rates[tier].append(rec["tps"])
            last[tier] = rec["stats"]
    return {
        "disk_reads": "page cache (hot)" if hot else "around the page cache (cold)",
        "ram_tier_tps": statistics.median(rates["ram"]),
        "disk_tier_tps": statistics.median(rates["disk"]),
        "disk_ratio": statistics.median(d / r for d, r in zip(rates["disk"], rates["ram"])),
        "disk_ratio_per_round": [d / r for d, r in zip(rates["disk"], rates["ram"])],
        "ram_tier_stats": last["ram"],
        "disk_tier_stats": last["disk"],
    }


def random_q4(rows: int, cols: int, rng: np.random.Generator, k_quant: bool) -> np.ndarray:
    """Random Q4_K (or Q4_0) bytes with small finite fp16 scales."""
    block, size = (256, 144) if k_quant else (32, 18)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if k_quant:
        raw[:, 2:4] = np.frombuffer(np.float16(0.005).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_expert_gguf(path: Path, layers: int, n_experts: int, hidden: int, inter: int) -> None:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(layers + 1)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(6)
    w.add_kv_lora_rank(512)
    w.add_rope_dimension_count(64)
    Q = gguf.GGMLQuantizationType
    for i in range(1, layers + 1):
        for name, (r, c) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            kq = c % 256 == 0  # V2-Lite's down rows (1408) are not whole Q4_K blocks: Q4_0, as our converter does
            data = np.stack([random_q4(r, c, rng, kq) for _ in range(n_experts)])
            w.add_tensor(f"blk.{i}.ffn_{name}_exps.weight", data, raw_dtype=Q.Q4_K if kq else Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cuda_time(fn, reps: int) -> float:
    """Median seconds of fn() measured with CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def cuda_mode(layers: int) -> dict:
    from offload import ExpertStacks, build_experts
    from offload.experts import expert_raws, host_expert, spec_of, write_expert
    from quant.gguf_file import GGUFFile

    out: dict = {"device": torch.cuda.get_device_name()}
    hidden, inter, n_exp, k = 2048, 1408, 64, 6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experts.gguf"
        write_expert_gguf(path, layers, n_exp, hidden, inter)
        f = GGUFFile(path)
        stacks = {i: ExpertStacks(*(f.tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")))
                  for i in range(1, layers + 1)}  # fmt: skip
        st = stacks[1]
        out["expert_file_bytes"] = sum(r.nbytes // n_exp for r in (st.gate, st.up, st.down))
        spec, raws = spec_of(st), expert_raws(st, 0)
        host = host_expert(raws, spec)  # the mmap's bytes, for CPU compute
        pinned = torch.empty(spec.nbytes, dtype=torch.uint8, pin_memory=True)
        staged = torch.empty(spec.nbytes, dtype=torch.uint8)
        write_expert(pinned, raws, spec)
        write_expert(staged, raws, spec)
        slot = torch.empty(spec.nbytes, dtype=torch.uint8, device="cuda")
        out["expert_bytes"] = spec.nbytes
        for name, src in (("pinned", pinned), ("pageable", staged)):
            slot.copy_(src, non_blocking=True)
            s = cuda_time(lambda src=src: slot.copy_(src, non_blocking=True), 50)
            out[f"h2d_{name}_ms"] = s * 1e3
            out[f"h2d_{name}_GBps"] = slot.nbytes / s / 1e9
        x = torch.randn(1, hidden)
        host(x)
        t0 = time.perf_counter()
        for _ in range(20):
            host(x)
        out["cpu_expert_batch1_ms"] = (time.perf_counter() - t0) / 20 * 1e3
        out["cpu_threads"] = torch.get_num_threads()

        rng = torch.Generator().manual_seed(0)
        routes = [[torch.randperm(n_exp, generator=rng)[:k].tolist() for _ in range(layers)] for _ in range(8)]
        xg = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.full((1, k), 1.0 / k, device="cuda")

        def step_time(engine, warm: bool) -> float:
            """Mean seconds per MoE layer over the routed steps (warm: the same routes run before)."""
            if warm:
                for r in routes:
                    for i, ids in enumerate(r, start=1):
                        engine(i, xg, torch.tensor([ids], device="cuda"), w)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for r in routes:
                for i, ids in enumerate(r, start=1):
                    engine(i, xg, torch.tensor([ids], device="cuda"), w)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / (len(routes) * layers)

        common = dict(gguf_file=f, gpu_memory=100 << 30, ram_memory=100 << 30, prefetch=False)
        res = build_experts(stacks, None, "cuda", torch.bfloat16, experts_on="device", **common)
        out["moe_layer_resident_ms"] = step_time(res, warm=True) * 1e3
        res.close()
        del res
        hits = build_experts(stacks, None, "cuda", torch.bfloat16, experts_on="ram", expert_cache=n_exp - 1,
                             miss_policy="fetch", **common)  # fmt: skip
        out["moe_layer_all_hits_ms"] = step_time(hits, warm=True) * 1e3
        hits.close()
        del hits
        for miss in ("fetch", "cpu"):
            e = build_experts(stacks, None, "cuda", torch.bfloat16, experts_on="ram", expert_cache=k,
                              miss_policy=miss, **common)  # fmt: skip
            # a fresh cache of k slots per layer and new routes each step: (nearly) every expert misses
            out[f"moe_layer_misses_{miss}_ms"] = step_time(e, warm=False) * 1e3
            out[f"moe_layer_misses_{miss}_stats"] = {
                key: e.stats()["total"][key] for key in ("hits", "misses", "stall_s", "cpu_experts")
            }
            e.close()
            del e
        auto = build_experts(stacks, None, "cuda", torch.bfloat16, experts_on="ram", expert_cache=k,
                             miss_policy="auto", **common)  # fmt: skip
        out["auto_calibration"] = {"copy_ms": auto.copy_s * 1e3, "cpu_ms_1tok": auto.cpu_cost[0][1] * 1e3,
                                   "chooses_cpu_at_batch1": auto._choose_cpu(1)}  # fmt: skip
        auto.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "lite" / "data" / "demo.gguf"))
    ap.add_argument("--cuda", action="store_true", help="time copies and MoE layers on the GPU")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers of the synthetic CUDA model (311 MB each)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per CPU measurement")
    ap.add_argument("--rounds", type=int, default=7, help="CPU: alternations of the compared backends")
    ap.add_argument("--device", default="cpu", help="the overhead ratio's device (cpu or cuda)")
    ap.add_argument("--overhead-only", action="store_true", help="skip the disk-tier ratio")
    ap.add_argument("--hot-disk", action="store_true", help="CPU: let the disk tier read through the page cache")
    ap.add_argument("--tier-child", choices=["ram", "disk"], help=argparse.SUPPRESS)
    ap.add_argument("--cpu-time", action="store_true", help="rate per process CPU second instead of wall second")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda:
        res = cuda_mode(args.layers)
    else:
        if not Path(args.model).is_file():
            print(f"no model at {args.model}; pass a GGUF path", file=sys.stderr)
            return 2
        if args.tier_child:
            print(json.dumps(tier_child(args.model, args.tier_child, args.tokens, args.hot_disk)))
            return 0
        res = overhead_mode(args.model, args.tokens, args.rounds, args.device)
        if not args.overhead_only:
            res.update(tiers_mode(args.model, args.tokens, max(args.rounds // 2, 1), args.hot_disk, args.threads))
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
