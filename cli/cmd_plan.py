"""`lite plan MODEL [--gpu-mem X] [--ram X] [-c N]`: where the weights would go, from metadata only."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF model file (only its metadata and tensor sizes are read)")
    p.add_argument(
        "--gpu-mem", default=None, metavar="SIZE",
        help="device budget: bytes, or e.g. 8GiB (default: free VRAM minus a reserve; required for --device cuda "
        "on a machine without a GPU; on CPU an optional cap on the device tier)",
    )  # fmt: skip
    p.add_argument(
        "--ram", default=None, metavar="SIZE",
        help="RAM budget for the experts (on CPU also the latent cache and expert slots), e.g. 32GiB; smaller than "
        "the experts = disk tier (default: available RAM - 2GiB)",
    )  # fmt: skip
    p.add_argument(
        "-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=None, metavar="N",
        help="context length to size the latent cache for (default: 4096 or the model's, the smaller; more than "
        "the model's is an error)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when present")
    p.add_argument(
        "--experts-on", default=None, choices=["auto", "device", "ram", "disk"],
        help="where routed experts live (default: decided by the budgets)",
    )  # fmt: skip
    p.add_argument(
        "--expert-cache", default=None, metavar="N|SIZE",
        help="device expert slots per MoE layer (N), or a byte budget such as 2GiB",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (bytes as integers)")


def run(args: argparse.Namespace) -> int:
    from cli import budget, common
    from lite.errors import LiteError
    from offload.planner import format_bytes, make_plan

    device = budget.planner_device(args.device)
    sizes = budget.model_sizes(common.resolve_model(args.model), device)
    ctx = budget.resolve_ctx(args.ctx, sizes.context_length, "-c/--ctx")
    opts = budget.offload_options(args, sizes)
    opts.setdefault("experts_on", "auto")
    try:
        plan = make_plan(sizes, device=device, ctx=ctx, cache_dtype_bytes=2 if device == "cuda" else 4, **opts)
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
