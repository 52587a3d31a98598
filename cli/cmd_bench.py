"""`lite bench [MODEL]`: prompt-processing and decode speed, TTFT, and expert-cache statistics."""

from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.table import Table

from cli import budget, common
from lite.bench import bench
from lite.errors import LiteError
from lite.threads import governor


def add_parser(p: argparse.ArgumentParser) -> None:
    common.add_model_arg(p)
    p.add_argument(
        "-p", "--n-prompt", type=int, default=None, metavar="N",
        help="prompt tokens to prefill (512, fewer when the context is smaller)",
    )  # fmt: skip
    p.add_argument(
        "-n", "--n-gen", type=int, default=None, metavar="N",
        help="tokens to decode (128, at most a quarter of the context)",
    )  # fmt: skip
    p.add_argument("-r", "--repetitions", type=int, default=3, metavar="N", help="timed repetitions (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens (%(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--trace", metavar="FILE.jsonl", help="record the routing (selected and predicted experts per "
                   "token and layer) as JSON lines, for benchmarks/cache_sim.py")  # fmt: skip
    common.add_context_arg(p, help_default="N_PROMPT + N_GEN")
    common.add_offload_args(p)
    p.epilog = "The context defaults to N_PROMPT + N_GEN; -p and -n left out fit the model's context (or -c)."


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> tuple[str, str]:
    if any(math.isnan(v) for v in s.values()):
        return "–", ""
    spread = f"{s['min'] * scale:.{digits}f} – {s['max'] * scale:.{digits}f} (sd {s['stdev'] * scale:.{digits}f})"
    return f"{s['median'] * scale:.{digits}f}", spread


def shape(args: argparse.Namespace, limit: int) -> tuple[int, int, int]:
    """(n_prompt, n_gen, ctx) from the flags; -p and -n left out fit -c, else the model's context `limit`."""
    for flag, value in (
        ("-p/--n-prompt", args.n_prompt),
        ("-n/--n-gen", args.n_gen),
        ("-r/--repetitions", args.repetitions),
    ):
        if value is not None and value < 1:
            raise LiteError(f"{flag} must be at least 1, got {value}")
    room = budget.resolve_ctx(args.ctx_size, limit, "-c/--ctx-size") if args.ctx_size is not None else limit
    n_gen = args.n_gen if args.n_gen is not None else max(1, min(128, room // 4))
    n_prompt = args.n_prompt if args.n_prompt is not None else max(1, min(512, room - n_gen))
    ctx = args.ctx_size or n_prompt + n_gen
    if n_prompt + n_gen > ctx or ctx > limit:
        what = f"the context of {ctx} (-c)" if args.ctx_size else f"the model's context of {limit}"
        raise LiteError(
            f"-p {n_prompt} plus -n {n_gen} need {n_prompt + n_gen} tokens, more than {what}; lower -p or -n"
        )
    return n_prompt, n_gen, ctx


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json, highlight=False, markup=False)
    path = common.resolve_model(args.model)
    limit = budget.model_sizes(path, budget.planner_device(args.device)).context_length
    args.n_prompt, args.n_gen, ctx = shape(args, limit)
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
    used = sorted({r["threads"] for r in result["runs"]}) or [result["threads"]]
    count = f"{used[0]}" if len(used) == 1 else f"{used[0]}–{used[-1]}"
    how = "" if args.threads is not None or governor() is None else " (following the free cores)"
    gemm = f", {result['prefill_gemm']} prefill GEMM" if result.get("prefill_gemm") else ""
    table = Table(title=f"{args.repetitions} repetitions, {count} thread{'s' if used[-1] > 1 else ''}{how}{gemm}")
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
