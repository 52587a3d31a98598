"""`lite bench [MODEL]`: prompt-processing and decode speed, TTFT, and expert-cache statistics."""

from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.table import Table

from cli import common
from lite.bench import bench


def add_parser(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    p.add_argument(
        "-p", "--n-prompt", type=int, default=512, metavar="N", help="prompt tokens to prefill (%(default)s)"
    )
    p.add_argument("-n", "--n-gen", type=int, default=128, metavar="N", help="tokens to decode (%(default)s)")
    p.add_argument("-r", "--repetitions", type=int, default=3, metavar="N", help="timed repetitions (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens (%(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--trace", metavar="FILE.jsonl", help="record the routing (selected and predicted experts per "
                   "token and layer) as JSON lines, for benchmarks/cache_sim.py")  # fmt: skip
    common.add_context_arg(p, default=None)
    common.add_offload_args(p)
    p.epilog = "The context defaults to N_PROMPT + N_GEN."


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> tuple[str, str]:
    if any(math.isnan(v) for v in s.values()):
        return "–", ""
    spread = f"{s['min'] * scale:.{digits}f} – {s['max'] * scale:.{digits}f} (sd {s['stdev'] * scale:.{digits}f})"
    return f"{s['median'] * scale:.{digits}f}", spread


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json, highlight=False, markup=False)
    ctx = args.ctx_size or args.n_prompt + args.n_gen
    model, path = common.load_model(args, console, ctx=ctx)
    with console.status(f"benchmarking {path.name} …", spinner="dots") as status:
        result = bench(
            model, args.n_prompt, args.n_gen, args.repetitions, ctx=ctx, seed=args.seed, trace=args.trace,
            progress=lambda i, n: status.update(f"benchmarking {path.name} … {i}/{n}"),
        )  # fmt: skip
    result["model"] = str(path)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    console.print(common.header_line(path, model, ctx), style="bold", soft_wrap=True)
    table = Table(title=f"{args.repetitions} repetitions, {result['threads']} threads")
    for col in ("test", "median", "spread (min – max)", "unit"):
        table.add_column(col, justify="right" if col != "test" else "left")
    table.add_row(f"pp{args.n_prompt}", *fmt(result["pp_tps"]), "tok/s")
    table.add_row(f"tg{args.n_gen}", *fmt(result["tg_tps"]), "tok/s")
    table.add_row("TTFT", *fmt(result["ttft_s"], 1000.0, 0), "ms")
    console.print(table)
    total = result["stats"].get("total") if isinstance(result["stats"], dict) else None
    if total:
        cache = Table(title="expert cache (timed runs)", show_header=False)
        for k, v in total.items():
            cache.add_row(k, common.stat_value(k, v))  # as /stats shows them: None is n/a
        console.print(cache)
    else:
        console.print("expert cache: no statistics (all experts resident)", style="dim")
    if args.trace:
        console.print(f"routing trace written to {args.trace}", style="dim")
    return 0
