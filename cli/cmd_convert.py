"""`lite convert INPUT -o OUT.gguf [--recipe R]`: a Hugging Face DeepSeek-V2/V3-family checkpoint (bf16 or
fp8) or a GGUF to GGUF, with progress.

On a terminal, a rich progress bar (tensors done, MB/s of input, ETA); otherwise a plain line every few seconds.
The last line says how long it took, how large the file is, its bits per weight and the peak memory.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import defaultdict

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from lite.convert.recipes import OUTTYPES, RECIPES, TYPE_NAMES

# the converter's own tables (recipes.py imports only gguf: the parser stays cheap to build)
RECIPE_CHOICES = RECIPES
TYPE_CHOICES = tuple(TYPE_NAMES)
OUTTYPE_CHOICES = OUTTYPES
PLAIN_EVERY_S = 5.0  # seconds between plain progress lines


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input", metavar="INPUT", help="Hugging Face model folder (config.json, *.safetensors) or a GGUF file"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        help="every tensor's type: lite (default; experts q4_k, rest q8_0) or llama.cpp's q4_k_m, q5_k_m, q6_k, q8_0",
    )
    p.add_argument("--experts", choices=TYPE_CHOICES, help="routed experts' type (overrides the recipe)")
    p.add_argument("--rest", choices=TYPE_CHOICES, help="every other matrix's type (overrides the recipe)")
    p.add_argument("--outtype", choices=OUTTYPE_CHOICES, help="one type for every weight (f32: exact)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists (it survives a failure)")
    p.add_argument("--dry-run", action="store_true", help="print each tensor's type and the output size; write nothing")
    p.add_argument("--allow-nonfinite", action="store_true", help="write weights holding NaN or Inf (else refused)")
    p.add_argument("--legacy-kv-b", action="store_true", help=argparse.SUPPRESS)  # older single attn_kv_b layout


def run(args: argparse.Namespace) -> int:
    from cli.common import terminate_cleanly

    with terminate_cleanly():  # SIGTERM/SIGHUP remove the temporary file, as Ctrl+C does
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from lite.convert import convert

    out = Console(highlight=False, soft_wrap=True)
    options = dict(recipe=args.recipe, outtype=args.outtype, experts=args.experts, rest=args.rest, force=args.force)
    options.update(allow_nonfinite=args.allow_nonfinite, legacy_kv_b=args.legacy_kv_b)
    if args.dry_run:
        summary = convert(args.input, args.output, dry_run=True, **options)
        _print_plan(out, summary)
        return 0
    if sys.stdout.isatty():
        columns = (
            TextColumn("{task.fields[tensors]} tensors"),
            BarColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        with Progress(*columns, console=out, transient=True) as bar:
            task = bar.add_task("reading", total=None, tensors="0/?")

            def progress(p) -> None:  # the bar, speed and ETA in input bytes
                bar.update(task, completed=p.bytes_done, total=p.bytes_total, description=p.name,
                           tensors=f"{p.tensors_done}/{p.tensors_total}")  # fmt: skip

            summary = convert(args.input, args.output, progress=progress, **options)
    else:
        summary = convert(args.input, args.output, progress=_PlainProgress(out), **options)
    _print_summary(out, summary)
    return 0


class _Meter:
    """MB/s of input since the start."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def mbps(self, done: int) -> float:
        return done / 1e6 / max(1e-9, time.perf_counter() - self.t0)


class _PlainProgress:
    """One line every PLAIN_EVERY_S seconds: tensors done, percent of input, MB/s, ETA and the current tensor."""

    def __init__(self, out: Console) -> None:
        self.out, self.meter, self.last = out, _Meter(), time.perf_counter()

    def __call__(self, p) -> None:
        now = time.perf_counter()
        if now - self.last < PLAIN_EVERY_S:
            return
        self.last = now
        mbps = self.meter.mbps(p.bytes_done)
        eta = (p.bytes_total - p.bytes_done) / 1e6 / mbps if mbps > 0 else float("nan")
        pct = 100.0 * p.bytes_done / max(1, p.bytes_total)
        self.out.print(
            f"[{p.tensors_done}/{p.tensors_total} tensors] {pct:5.1f}% {mbps:.1f} MB/s ETA {_clock(eta)} {p.name}"
        )


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds < 0:
        return "-:--"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
    table = Table(title=f"plan for {summary.out_path} (recipe {summary.recipe})", box=None, title_justify="left")
    for col in ("tensor", "shape", "type", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for t in summary.tensors:
        table.add_row(t.name, "×".join(map(str, t.shape)), t.qtype.name, decimal(t.out_bytes))
    out.print(table)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for t in summary.tensors:
        groups[(t.role, t.qtype.name)].append(t)
    by = Table(box=None)
    for col in ("weights", "type", "tensors", "parameters", "size"):
        by.add_column(col, justify="left" if col in ("weights", "type") else "right")
    for (role, qtype), ts in sorted(groups.items(), key=lambda kv: -sum(t.out_bytes for t in kv[1])):
        params = sum(t.n_elements for t in ts)
        by.add_row(role, qtype, str(len(ts)), f"{params:,}", decimal(sum(t.out_bytes for t in ts)))
    out.print(by)
    out.print(f"{len(summary.tensors)} tensors ({_types_line(summary)}); {_bpw_line(summary)}")
    if summary.fallbacks:
        out.print(f"fallbacks ({len(summary.fallbacks)}):")
        for line in _fallback_lines(summary):
            out.print(line)
    for note in summary.notes:
        out.print(f"note: {note}")
    out.print(f"input {decimal(summary.input_bytes)} → estimated output {decimal(summary.output_bytes)} (dry run)")


def _print_summary(out: Console, summary) -> None:
    out.print(f"[bold green]wrote[/] {summary.out_path} (recipe {summary.recipe})")
    out.print(f"  {len(summary.tensors)} tensors: {_types_line(summary)}")
    out.print(f"  {_bpw_line(summary)}, {summary.n_params:,} parameters")
    out.print(f"  input {decimal(summary.input_bytes)} → output {decimal(summary.output_bytes)}")
    if summary.fallbacks:
        out.print(f"  fallbacks ({len(summary.fallbacks)}):")
        for line in _fallback_lines(summary):
            out.print("  " + line)
    out.print(f"  tokenizer: {'yes' if summary.tokenizer else 'none'}")
    for note in summary.notes:
        out.print(f"  note: {note}")
    out.print(f"next: lite chat {shlex.quote(str(summary.out_path))}")
    out.print(
        f"done in {summary.seconds:.1f} s: {decimal(summary.output_bytes)}, {summary.overall_bpw:.2f} bits/weight, "
        f"peak RSS {summary.peak_rss_bytes / 2**30:.2f} GiB"
    )
