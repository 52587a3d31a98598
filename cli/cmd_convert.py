"""`lite convert HF_DIR -o OUT.gguf`: a Hugging Face DeepSeek-V2/V3-family checkpoint to GGUF, with a progress bar."""

from __future__ import annotations

import argparse
import shlex
from collections import defaultdict

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

EXPERT_CHOICES = ("q4_k", "q4_0", "q8_0", "bf16", "f16", "f32")
REST_CHOICES = ("q8_0", "bf16", "f16", "f32")
OUTTYPE_CHOICES = ("f32", "bf16", "f16", "q8_0")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--outtype", choices=OUTTYPE_CHOICES, help="one type for every weight (f32: exact)")
    p.add_argument("--experts", choices=EXPERT_CHOICES, help="routed experts' type (default q4_k)")
    p.add_argument(
        "--rest", choices=REST_CHOICES, help="attention, shared experts, dense FFN, embeddings (default q8_0)"
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimated size; write nothing")
    p.add_argument("--legacy-kv-b", action="store_true", help=argparse.SUPPRESS)  # older single attn_kv_b layout


def run(args: argparse.Namespace) -> int:
    from cli.common import terminate_cleanly

    with terminate_cleanly():  # SIGTERM/SIGHUP remove the temporary file, as Ctrl+C does
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from lite.convert import convert

    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False)
    options = dict(outtype=args.outtype, experts=args.experts, rest=args.rest, force=args.force)
    options["legacy_kv_b"] = args.legacy_kv_b
    if args.dry_run:
        summary = convert(args.hf_dir, args.output, dry_run=True, **options)
        _print_plan(out, summary)
        return 0
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("reading", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        summary = convert(args.hf_dir, args.output, progress=progress, **options)
    _print_summary(out, summary)
    return 0


def _types_line(summary) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(summary.type_counts.items(), key=lambda kv: -kv[1]))


def _bpw_line(summary) -> str:
    line = f"{summary.overall_bpw:.2f} bits/weight overall"
    if summary.expert_bpw is not None:
        line = f"routed experts {summary.expert_bpw:.2f} bits/weight, " + line
    return line


def _fallback_lines(summary, limit: int = 6) -> list[str]:
    fb = summary.fallbacks
    lines = [f"  {name}: {want} → {got} (rows are not whole {want} blocks)" for name, want, got in fb[:limit]]
    if len(fb) > limit:
        lines.append(f"  … and {len(fb) - limit} more tensors the same way")
    return lines


def _print_plan(out: Console, summary) -> None:
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for t in summary.tensors:
        groups[(t.role, t.qtype.name)].append(t)
    table = Table(title=f"plan for {summary.out_path}", box=None, title_justify="left")
    for col in ("weights", "type", "tensors", "parameters", "size"):
        table.add_column(col, justify="left" if col in ("weights", "type") else "right")
    for (role, qtype), ts in sorted(groups.items(), key=lambda kv: -sum(t.out_bytes for t in kv[1])):
        params = sum(t.n_elements for t in ts)
        table.add_row(role, qtype, str(len(ts)), f"{params:,}", decimal(sum(t.out_bytes for t in ts)))
    out.print(table)
    out.print(f"{len(summary.tensors)} tensors ({_types_line(summary)}); {_bpw_line(summary)}")
    if summary.fallbacks:
        out.print(f"fallbacks ({len(summary.fallbacks)}):")
        for line in _fallback_lines(summary):
            out.print(line)
    for note in summary.notes:
        out.print(f"note: {note}")
    out.print(f"input {decimal(summary.input_bytes)} → estimated output {decimal(summary.output_bytes)} (dry run)")


def _print_summary(out: Console, summary) -> None:
    out.print(f"[bold green]wrote[/] {summary.out_path} in {summary.seconds:.1f} s")
    out.print(f"  {len(summary.tensors)} tensors: {_types_line(summary)}")
    out.print(f"  {_bpw_line(summary)}, {summary.n_params:,} parameters")
    out.print(f"  input {decimal(summary.input_bytes)} → output {decimal(summary.output_bytes)}")
    if summary.fallbacks:
        out.print(f"  fallbacks ({len(summary.fallbacks)}):")
        for line in _fallback_lines(summary):
            out.print("  " + line)
    out.print(f"  tokenizer: {'yes, with chat template' if summary.tokenizer else 'none'}")
    for note in summary.notes:
        out.print(f"  note: {note}")
    out.print(f"next: lite chat {shlex.quote(str(summary.out_path))}")
