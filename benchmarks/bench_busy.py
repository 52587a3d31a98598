"""Decode speed on a busy machine: lite's thread choices beside another multi-threaded torch job.

For each round, first on the machine as it is ("idle") and then while a background job runs 2-thread torch
matmuls ("busy"; started and stopped by this script, with default OpenMP settings, as any torch program has
them), each variant decodes the bundled demo model in its own process for `--seconds` of decode time:

- `default`: `lite`'s default threads (the count follows the free cores: lite/threads.py);
- `-t 1`, `-t 2`: fixed counts;
- `before`: what the default was before (LITE_THREADS=torch: torch's thread count, the physical cores);
- `passive` (only when named in --variants): `-t 2` with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep).

Each child loads the model through the CLI's own code (`cli.main` first, so the environment is set before torch
loads, then `cli.common.load_model`), then runs chat-like turns: reset, prefill 16 tokens, decode up to 128
greedily, until the time is up. Prints decode tok/s per variant and condition (median over rounds), the ratio
busy / idle, and the thread counts the default used. Variants rotate their order every round.

    python benchmarks/bench_busy.py                   # 3 rounds, ~2-3 minutes
    python benchmarks/bench_busy.py --rounds 5 --seconds 5 --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lite, not another installed one
VARIANTS = {
    "default": ([], {}),
    "-t 1": (["-t", "1"], {}),
    "-t 2": (["-t", "2"], {}),
    "before": ([], {"LITE_THREADS": "torch"}),
    "passive": (["-t", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
}
DEFAULT_VARIANTS = ("default", "-t 1", "-t 2", "before")
BUSY_JOB = """
import sys, time
import torch
torch.set_num_threads(2)
a, b = torch.randn(512, 512), torch.randn(512, 512)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(10):
        a @ b
"""


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LITE_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def start_busy(seconds: float) -> subprocess.Popen:
    """The background job: 2 torch threads multiplying 512x512 matrices, for at most `seconds`."""
    job = subprocess.Popen(
        [sys.executable, "-c", BUSY_JOB, str(seconds)], env=clean_env({}), stdout=subprocess.PIPE, text=True
    )
    assert job.stdout is not None
    if job.stdout.readline().strip() != "ready":
        job.kill()
        raise RuntimeError("the background job did not start")
    time.sleep(0.5)  # its threads are up and spinning
    return job


def stop_busy(job: subprocess.Popen) -> None:
    job.terminate()
    try:
        job.wait(timeout=10)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()


def run_child(variant: str, seconds: float, timeout: float) -> dict:
    flags, extra = VARIANTS[variant]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--seconds", str(seconds), *flags]
    try:
        out = subprocess.run(
            cmd, env=clean_env(extra), capture_output=True, text=True, timeout=timeout, check=True, cwd=str(ROOT)
        )
    except subprocess.TimeoutExpired:
        return {"tok_s": float("nan"), "error": "timeout"}
    except subprocess.CalledProcessError as e:
        return {"tok_s": float("nan"), "error": (e.stderr or "").strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(seconds: float, threads: int | None) -> None:
    entry = importlib.import_module("cli.main")  # the `lite` command's own code path
    import torch
    from rich.console import Console

    from cli import common
    from lite.threads import governor

    args = entry.build_parser().parse_args(["bench", *(["-t", str(threads)] if threads else [])])
    model, _ = common.load_model(args, Console(quiet=True), ctx=160)
    gov = governor()
    session = model.session(160)
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()

    def turn(n_gen: int, deadline: float) -> tuple[int, float, dict[int, int]]:
        session.reset()
        tok = int(torch.argmax(session.feed(prompt)))
        used: dict[int, int] = {}
        t0 = time.perf_counter()
        n = 0
        while n < n_gen and time.perf_counter() < deadline:
            tok = int(torch.argmax(session.feed([tok])))
            n += 1
            k = torch.get_num_threads()
            used[k] = used.get(k, 0) + 1
        return n, time.perf_counter() - t0, used

    turn(8, float("inf"))  # warm-up
    deadline = time.perf_counter() + seconds
    tokens, spent, used = 0, 0.0, {}
    while time.perf_counter() < deadline:
        n, s, u = turn(128, deadline)
        tokens, spent = tokens + n, spent + s
        for k, v in u.items():
            used[k] = used.get(k, 0) + v
    print(json.dumps({
        "tok_s": tokens / spent if spent else float("nan"),
        "tokens": tokens,
        "threads_used": {str(k): v for k, v in sorted(used.items())},  # thread count -> decode steps
        "others": round(gov.others, 2) if gov else None,  # cores the governor last saw busy with others
        "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="decode time per variant and condition (3)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-t", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.seconds, a.t)
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    timeout = 60 + 10 * a.seconds
    results: dict[str, dict[str, list[dict]]] = {v: {"idle": [], "busy": []} for v in variants}
    load0 = os.getloadavg()
    t_start = time.monotonic()
    for r in range(a.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for condition in ("idle", "busy"):
            job = start_busy(len(order) * timeout) if condition == "busy" else None
            try:
                for v in order:
                    res = run_child(v, a.seconds, timeout)
                    results[v][condition].append(res)
                    print(f"round {r + 1} {condition:4} {v:8} {res['tok_s']:8.1f} tok/s  "
                          f"{res.get('threads_used', res.get('error'))}", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                if job is not None:
                    stop_busy(job)
    elapsed = time.monotonic() - t_start

    def med(v: str, c: str) -> float:
        xs = [x["tok_s"] for x in results[v][c] if x["tok_s"] == x["tok_s"]]
        return statistics.median(xs) if xs else float("nan")

    print(f"\ndemo model decode, {a.rounds} rounds x {a.seconds:g} s per cell; load average at start "
          f"{load0[0]:.2f} (1 min); {os.cpu_count()} CPUs; {elapsed:.0f} s in all")  # fmt: skip
    print("| threads | idle tok/s | busy tok/s (a 2-thread torch matmul job beside) | busy / idle | idle vs default |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = med("default", "idle") if "default" in variants else float("nan")
    for v in variants:
        idle, busy = med(v, "idle"), med(v, "busy")
        ratios = [b["tok_s"] / i["tok_s"] for i, b in zip(results[v]["idle"], results[v]["busy"])]
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"| {v} | {idle:.0f} | {busy:.0f} | {busy / idle:.2f}{spread} | {idle / base:.2f} |")
    if "default" in variants:
        for c in ("idle", "busy"):
            used: dict[str, int] = {}
            for x in results["default"][c]:
                for k, n in (x.get("threads_used") or {}).items():
                    used[k] = used.get(k, 0) + n
            total = sum(used.values()) or 1
            share = ", ".join(f"{k} thread{'s' if k != '1' else ''} {100 * n / total:.0f}%" for k, n in used.items())
            print(f"default, {c}: decode steps by thread count: {share}")
    if a.json:
        Path(a.json).write_text(json.dumps({"load_average": load0, "results": results}, indent=1))


if __name__ == "__main__":
    main()
