"""`lite info FILE.gguf`: metadata, tensor types, sizes and bits per weight."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.gguf", help="a GGUF model file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor (name, type, shape, size)")
    p.add_argument("--full", action="store_true", help="print long metadata arrays and strings in full")


def run(args: argparse.Namespace) -> int:
    from lite.info import describe

    d = describe(args.file, full=args.full)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{d['path']}[/]  {decimal(d['file_bytes'])}, architecture {d['architecture']}")
    console.print(f"family {d['family']}" + (f"; router {d['router']}" if d["router"] else ""))

    meta = Table(title="metadata", show_header=True, box=None, title_justify="left")
    meta.add_column("key", style="cyan", no_wrap=True)
    meta.add_column("value", overflow="fold")
    for key, value in d["metadata"].items():
        meta.add_row(key, f"{value:.7g}" if isinstance(value, float) else str(value))
    console.print(meta)

    types = Table(title="tensor types", box=None, title_justify="left")
    for col in ("type", "tensors", "parameters", "size", "bits/weight"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for name, t in d["types"].items():
        bpw = 8.0 * t["bytes"] / max(1, t["params"])
        types.add_row(name, str(t["count"]), f"{t['params']:,}", decimal(t["bytes"]), f"{bpw:.2f}")
    console.print(types)

    if args.tensors:
        table = Table(title="tensors", box=None, title_justify="left")
        for col in ("name", "type", "shape", "size"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for t in d["tensors"]:
            table.add_row(t["name"], t["type"], "×".join(map(str, t["shape"])), decimal(t["bytes"]))
        console.print(table)

    line = f"{d['n_tensors']} tensors, {d['n_params']:,} parameters, {decimal(d['data_bytes'])} of weights, "
    line += f"{d['bits_per_weight']:.2f} bits/weight"
    if d["expert_bits_per_weight"] is not None:
        line += f" (routed experts {d['expert_bits_per_weight']:.2f})"
    console.print(line)
    return 0
