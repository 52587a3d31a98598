"""`lite plan MODEL [-c N] [--gpu-mem X] [--ram X] ...`: where the weights would go, from metadata only."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from cli import common


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF model file (only its metadata and tensor sizes are read)")
    common.add_context_arg(p)
    p.add_argument("--ctx", dest="ctx_size", type=int, help=argparse.SUPPRESS)  # the old spelling
    common.add_offload_args(p, runtime=False)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (bytes as integers)")
    p.epilog = "On CPU the device tier is RAM: --ram then also holds the latent cache and the expert slots."


def run(args: argparse.Namespace) -> int:
    from cli import budget
    from lite.errors import LiteError
    from offload.planner import format_bytes, make_plan

    device = budget.planner_device(args.device)
    path = common.resolve_model(args.model)
    sizes = budget.model_sizes(path, device)
    ctx = budget.resolve_ctx(args.ctx_size, sizes.context_length, "-c/--ctx-size")
    opts = budget.offload_options(args, sizes)
    opts.setdefault("experts_on", "auto")
    try:
        cache_bytes = budget.cache_dtype_bytes(path, device, common.cache_dtype(args))
        plan = make_plan(sizes, device=device, ctx=ctx, cache_dtype_bytes=cache_bytes, **opts)
    except LiteError as e:
        raise LiteError(budget.flag_names(str(e), "-c")) from None
    if args.json:
        print(json.dumps({"model": str(args.model), **plan.to_json()}, indent=1))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]{args.model}[/]: {len(sizes.moe_layers)} MoE layers x {sizes.n_experts} experts "
        f"(top-{sizes.experts_per_token}), device {device}, context {plan.ctx} tokens"
    )
    table = Table(box=None)
    table.add_column("what")
    table.add_column("where")
    table.add_column("bytes", justify="right")
    for what, where, size in plan.rows():
        table.add_row(what, where, size)
    console.print(table)
    hit = f"{plan.slots_per_layer}/{plan.n_experts}"
    console.print(f"experts on [bold]{plan.experts_on}[/]; device cache {hit} experts per layer "
                  f"({format_bytes(plan.cache_bytes)})")  # fmt: skip
    for note in plan.notes:
        console.print(f"note: {note}", style="yellow")
    return 0
