"""`lite serve` against `lite run`: decode speed, time to first token with and without the prefix cache, a soak.

    python benchmarks/bench_serve.py [--model M.gguf] [--threads 2] [--tokens 200] [--reps 3]
                                     [--turns 10] [--soak 500] [--clients 8] [--per-client 25]

Each part starts `lite serve` as its own process on a free loopback port and drives it with the openai client.

1. decode: `lite run --json --temp 0 -n TOKENS` (a fresh process per repetition) against the same raw prompt
   through the server (greedy, so the same tokens): the server's decode tok/s (`/stats`, counted as `lite run`
   counts) of a whole and of a streamed response, and the client's view of the stream (first to last chunk,
   read as raw SSE lines). Repetitions alternate run and server; medians.
2. TTFT of turn TURNS of a chat (streamed; each turn's reply is up to 16 tokens): with a second client's request
   between turns (so the working session holds the other conversation), against a server with the prefix cache
   (`--cache-mem 1GiB`) and one without (`--cache-mem 0`); and one client alone (the working session).
3. soak: SOAK sequential requests, then CLIENTS concurrent clients × PER_CLIENT requests each, every one a new
   conversation with a shared prefix (so the prefix cache churns at its 8 MiB bound); the server's RSS after a
   warm-up of 50 requests and at the end, and the number of errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The king"
USER_LINES = [
    "Good morrow, my lord.", "What news from the court?", "Speak, sweet lady.", "Where is the duke?",
    "I pray you, tell me more.", "And what of the queen?", "Is the king well?", "Why do you weep?",
    "Shall we go to the field?", "What say you now?", "Is it done?", "Farewell, then.",
]  # fmt: skip


def lite(*args: str, threads: int, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args, "-t", str(threads)], cwd=ROOT, env=env,
                            text=True, **kw)  # fmt: skip


class Served:
    """`lite serve MODEL --port 0 ...` in a subprocess, for a `with` block."""

    def __init__(self, model: str, threads: int, *flags: str):
        self.proc = lite("serve", model, "--port", "0", *flags, threads=threads, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)  # fmt: skip
        line = self.proc.stdout.readline()
        match = re.search(r"http://\S+:(\d+)/v1", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"lite serve did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=600)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=60).json()

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def stream_times(s: Served, body: dict) -> list[float]:
    """Arrival times of the streamed chunks that carry text (raw SSE lines through httpx: a light client)."""
    times = []
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                times.append(time.perf_counter())
    return times


def bench_decode(a: argparse.Namespace) -> dict:
    runs: dict[str, list[float]] = {"lite_run": [], "server": [], "server_stream": [], "client_stream": []}
    body = {"prompt": PROMPT, "max_tokens": a.tokens, "temperature": 0}
    with Served(a.model, a.threads, "-c", "512") as s:
        for _ in range(a.reps):
            p = lite("run", a.model, "--json", "--temp", "0", "-n", str(a.tokens), "-p", PROMPT, threads=a.threads,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
            rec = json.loads(p.communicate()[0])
            runs["lite_run"].append(rec["generation_tokens_per_second"])
            r = s.client.completions.create(model="m", **body)
            runs["server"].append(s.stats()["speed"]["last_request"]["decode_tokens_per_second"])
            n = r.usage.completion_tokens
            assert rec["generated_tokens"] >= n  # greedy: the same tokens (run counts an eos it stops at)
            times = stream_times(s, body)
            runs["server_stream"].append(s.stats()["speed"]["last_request"]["decode_tokens_per_second"])
            runs["client_stream"].append((n - 1) / (times[-1] - times[0]))
    out = {"tokens": n, **{k: median(v) for k, v in runs.items()}, "all": runs}
    for k in ("server", "server_stream", "client_stream"):
        out[f"{k}_vs_run"] = out[k] / out["lite_run"] - 1
    return out


def ttft_of_turn(s: Served, turns: int, interleave: bool, rep: int) -> tuple[float, int, int]:
    """Chat `turns` turns (a conversation of its own for each `rep`); (TTFT of the last, its prompt tokens, its
    cached tokens)."""
    msgs: list[dict] = []
    for turn in range(turns):
        msgs.append({"role": "user", "content": f"{rep}. {USER_LINES[turn % len(USER_LINES)]}"})
        if interleave:  # another client's conversation takes the working session
            other = [{"role": "user", "content": f"Another client, request {turn}: how fares the realm?"}]
            s.client.chat.completions.create(model="m", messages=other, max_tokens=4, seed=turn)
        t0, ttft, text, usage = time.perf_counter(), None, [], None
        stream = s.client.chat.completions.create(model="m", messages=msgs, max_tokens=16, seed=turn, stream=True,
                                                  stream_options={"include_usage": True})  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - t0
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        msgs.append({"role": "assistant", "content": "".join(text)})
    return ttft or float("nan"), usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


def bench_ttft(a: argparse.Namespace) -> dict:
    out = {}
    for name, flags, interleave in [
        ("prefix_cache", ("--cache-mem", "1GiB"), True),
        ("no_prefix_cache", ("--cache-mem", "0"), True),
        ("one_client", ("--cache-mem", "0"), False),
    ]:
        with Served(a.model, a.threads, "-c", "512", *flags) as s:
            runs = [ttft_of_turn(s, a.turns, interleave, rep) for rep in range(a.reps)]
        out[name] = {"ttft_ms": 1000 * median([r[0] for r in runs]), "prompt_tokens": runs[-1][1],
                     "cached_tokens": runs[-1][2]}  # fmt: skip
    return out


def bench_soak(a: argparse.Namespace) -> dict:
    errors: list[str] = []
    words = "Now is the winter of our discontent made glorious summer by this sun of York".split()

    def request(s: Served, i: int) -> None:
        text = f"Request {i}: " + " ".join(words[(i + k) % len(words)] for k in range(12))
        try:
            if i % 2:
                r = s.client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                     max_tokens=12, seed=i)  # fmt: skip
                assert r.choices[0].finish_reason in ("stop", "length")
            else:
                stream = s.client.completions.create(model="m", prompt=text, max_tokens=12, seed=i, stream=True)
                assert sum(1 for _ in stream) >= 1
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    with Served(a.model, a.threads, "-c", "512", "--cache-mem", "8MiB", "--max-queue", str(a.clients)) as s:
        for i in range(50):
            request(s, -1 - i)
        rss0, t0, trace = s.rss(), time.perf_counter(), []
        for i in range(a.soak):
            request(s, i)
            if i % 100 == 99:
                trace.append(round(s.rss() / 2**20, 1))
        seq_s = time.perf_counter() - t0

        def client(c: int) -> None:
            for k in range(a.per_client):
                request(s, 100_000 + c * a.per_client + k)

        t1 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_s = time.perf_counter() - t1
        rss1, stats = s.rss(), s.stats()
    return {
        "sequential": a.soak, "sequential_s": seq_s, "concurrent": a.clients * a.per_client, "concurrent_s": conc_s,
        "rss_start_mib": rss0 / 2**20, "rss_end_mib": rss1 / 2**20, "rss_change": rss1 / rss0 - 1,
        "rss_every_100_mib": trace,
        "errors": len(errors), "first_errors": errors[:3], "served": stats["requests"]["served"],
        "prefix_cache": stats["prefix_cache"],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "lite" / "data" / "demo.gguf"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both (%(default)s: two collapse on a busy 2-core machine)",
    )
    p.add_argument("--tokens", type=int, default=200, help="decode length (%(default)s)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--soak", type=int, default=500, help="sequential requests of the soak (%(default)s)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=25)
    p.add_argument("--only", choices=["decode", "ttft", "soak"], action="append", help="run only these parts")
    a = p.parse_args()
    parts = {"decode": bench_decode, "ttft": bench_ttft, "soak": bench_soak}
    result = {"load_before": os.getloadavg()[0]}
    for name in a.only or list(parts):
        t0 = time.perf_counter()
        result[name] = parts[name](a)
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(result[name])}", file=sys.stderr, flush=True)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
