"""Flags, model loading and rendering shared by chat, run, bench and perplexity."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lite import threads
from lite.errors import ContextTooSmall, LiteError
from lite.sampling import METADATA_KEYS, SamplingParams, check
from offload.sizes import DEFAULT_CTX, format_bytes

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "lite" / "data" / "demo.gguf"
DEFAULTS = SamplingParams()
DEFAULT_MAX_TOKENS = 512


class Terminated(BaseException):
    """SIGTERM or SIGHUP turned into an exception in the main thread, so `finally` blocks clean up as they do
    for Ctrl+C (KeyboardInterrupt); `main` exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP (a closed terminal) raise `Terminated` instead of killing the
    process on the spot; the previous handlers come back afterwards."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave the default
                pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def unexpected(e: BaseException) -> str:
    """One line for an error lite did not anticipate: its type, the first line of its message, and --debug."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(text) > 200:
        text = text[:197] + "..."
    what = type(e).__name__ + (f": {text}" if text else "")
    return f"error: unexpected {what} (a bug in lite; run again with --debug for the traceback)"


def user_message(e: LiteError) -> str:
    """A library error as the CLI says it: where the context is too small, the flag that sets it."""
    return f"{e} (-c/--ctx-size)" if isinstance(e, ContextTooSmall) else str(e)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", metavar="MODEL", help="a .gguf file (default: the bundled demo model lite/data/demo.gguf)"
    )


# flag (its argparse dest) -> SamplingParams field
SAMPLING_FLAGS = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
}


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    g = p.add_argument_group(
        "sampling (llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature; defaults: the model's "
        "general.sampling.* values when its GGUF has them, else the values shown)"
    )
    d = DEFAULTS
    g.add_argument("--temp", type=float, metavar="X", help=f"temperature; 0 = greedy ({d.temperature})")
    g.add_argument("--top-k", type=int, metavar="N", help=f"keep the k likeliest tokens; 0 = off ({d.top_k})")
    g.add_argument("--top-p", type=float, metavar="X", help=f"nucleus: smallest set with this mass ({d.top_p})")
    g.add_argument("--min-p", type=float, metavar="X", help=f"drop tokens below min-p × the top one ({d.min_p})")
    g.add_argument(
        "--repeat-penalty", type=float, metavar="X",
        help=f"penalise the last {d.repeat_last_n} tokens; 1 = off ({d.repeat_penalty})",
    )  # fmt: skip
    g.add_argument(
        "-n", "--max-tokens", type=int, default=max_tokens, metavar="N", help="most tokens per reply (%(default)s)"
    )
    g.add_argument("--seed", type=int, metavar="N", help="random seed; the same seed and settings give the same output")


def add_context_arg(
    p: argparse.ArgumentParser, help_default: str = f"{DEFAULT_CTX} or the model's, the smaller"
) -> None:
    p.add_argument(
        "-c", "--ctx-size", type=int, default=None, metavar="N",
        help=f"context length in tokens (default: {help_default}; more than the model's is an error)",
    )  # fmt: skip
    p.add_argument(
        "--cache-type", choices=tuple(CACHE_TYPES), default="auto",
        help="latent cache values: auto (bf16 on CUDA, and on CPUs with bf16 instructions for quantized models; "
        "else f32), f32 or bf16",
    )  # fmt: skip


CACHE_TYPES = {"auto": None, "f32": torch.float32, "bf16": torch.bfloat16}


def cache_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--cache-type as a torch dtype (None: lite.load's default)."""
    return CACHE_TYPES[getattr(args, "cache_type", "auto")]


def add_offload_args(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    """The memory flags; `runtime=False` (lite plan) leaves out those that only matter while running."""
    g = p.add_argument_group("memory (where the routed experts live; see `lite plan`)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (%(default)s)")
    if runtime:
        g.add_argument(
            "-t", "--threads", type=int, metavar="N",
            help="CPU threads (default: the cores that other programs leave free, up to the physical cores; "
            "re-checked every 0.5 s)",
        )  # fmt: skip
    g.add_argument(
        "--gpu-mem", metavar="SIZE",
        help="device memory budget: bytes, or e.g. 6GiB, 500MB (default: free memory - reserve)",
    )  # fmt: skip
    g.add_argument(
        "--ram", metavar="SIZE", help="RAM budget for experts, e.g. 8GiB; smaller than the experts = disk tier"
    )
    g.add_argument(
        "--experts-on", choices=["auto", "device", "ram", "disk"], default=None,
        help="where experts are kept: all on the device, in RAM, or read from the file (default: auto, planned)",
    )  # fmt: skip
    g.add_argument(
        "--expert-cache", metavar="N|SIZE", default=None,
        help="device expert cache: N slots per MoE layer, or a byte budget such as 2GiB (default: planned)",
    )  # fmt: skip
    if not runtime:
        return
    g.add_argument(
        "--prefetch", metavar="on|off|N", default=None,
        help="router-predicted prefetch of the next layers' experts: on, off, or a lookahead in layers",
    )  # fmt: skip
    g.add_argument(
        "--miss-policy", metavar="auto|fetch|cpu", default=None,
        help="an expert missing from the device cache: copy it in (fetch), run it on the CPU (cpu), or pick per "
        "miss from measured times (default: auto)",
    )  # fmt: skip


def sampling_params(args: argparse.Namespace, metadata: dict[str, Any] | None = None) -> SamplingParams:
    """Flags first, then the model's recommended values (GGUF `general.sampling.*`), then lite's defaults;
    each checked by `lite.sampling.check` under the name the user gave it. Call it once without metadata
    before loading, to reject bad flags early."""
    values: dict[str, Any] = {}
    for flag, field in SAMPLING_FLAGS.items():
        if getattr(args, flag) is not None:
            values[field] = check(field, getattr(args, flag), f"--{flag.replace('_', '-')}")
    values["seed"] = check("seed", args.seed, "--seed")
    check("max_tokens", args.max_tokens, "-n/--max-tokens")
    try:
        return SamplingParams.from_metadata(metadata, **values)
    except LiteError as e:  # a bad value in the file: name the flag that overrides it
        flags = [
            f"--{flag.replace('_', '-')}" for flag, field in SAMPLING_FLAGS.items() if METADATA_KEYS[field] in str(e)
        ]
        raise LiteError(f"{e}; override it with {flags[0]}" if flags else str(e)) from None


def resolve_model(path: str | None) -> Path:
    if path is None:
        if DEFAULT_MODEL.is_file():
            return DEFAULT_MODEL
        raise LiteError(
            "no MODEL given and the bundled demo model is missing; convert one with "
            "`lite convert HF_DIR -o model.gguf` (e.g. DeepSeek-V2-Lite-Chat) and pass model.gguf"
        )
    p = Path(path)
    if p.is_dir():
        raise LiteError(f"{path} is a directory, not a model file; pass the .gguf file itself")
    if not p.exists():
        raise LiteError(f"model file not found: {path}; pass the path of a .gguf file")
    return p


def load_model(
    args: argparse.Namespace,
    console: Console,
    ctx: int | None = None,
    ctx_flag: str = "-c/--ctx-size",
    ctx_default: int = DEFAULT_CTX,
) -> tuple[Any, Path]:
    """Resolve MODEL and load it quietly, with a spinner on a terminal. The context (`ctx`, else -c, else
    min(`ctx_default`, the model's)) is settled and checked against the model before budgets are planned."""
    import lite
    from cli import budget

    path = resolve_model(args.model)
    governor = set_threads(getattr(args, "threads", None))
    sizes = budget.model_sizes(path, budget.planner_device(args.device))
    requested = ctx if ctx is not None else getattr(args, "ctx_size", None)
    options = budget.offload_options(args, sizes)
    options["ctx"] = budget.resolve_ctx(requested, sizes.context_length, ctx_flag, ctx_default)
    with console.status(f"loading {path.name} …", spinner="dots"):
        try:
            model = lite.load(str(path), device=args.device, cache_dtype=cache_dtype(args), **options)
        except LiteError as e:  # the planner's option names -> the flags the user typed
            raise LiteError(budget.flag_names(str(e), "--ctx" if ctx_flag == "--ctx" else "-c")) from None
    if governor is not None:
        governor.update(wait=True)  # the first decision, from what the machine did while the model loaded
    return model, path


def set_threads(n: int | None) -> threads.ThreadGovernor | None:
    """-t N: exactly N threads. Without -t (and without OMP_NUM_THREADS or LITE_THREADS=torch in the
    environment): the count follows the cores other processes leave free (`lite.threads`), at most torch's
    default; returns that governor."""
    threads.fixed()
    if n is not None:
        most = 4 * (os.cpu_count() or 1)  # far more OpenMP threads than cores crashes torch (100000: SIGSEGV)
        if not 1 <= n <= most:
            raise LiteError(f"-t/--threads must be from 1 to {most} (4 x the CPU count), got {n}")
        torch.set_num_threads(n)
        return None
    if not threads.enabled() or os.environ.get("OMP_NUM_THREADS"):
        return None
    return threads.auto()


def context_size(args: argparse.Namespace, model: Any) -> int:
    """-c, or min(DEFAULT_CTX, the model's context); as `load_model` planned it."""
    from cli import budget

    return budget.resolve_ctx(args.ctx_size, int(model.max_context), "-c/--ctx-size")


def stat_value(key: str, value: Any) -> str:
    """One `model.stats()` figure for a table: sizes in bytes humanised, ratios with 3 digits, None as n/a."""
    if value is None:
        return "n/a"
    if key.startswith("bytes") or key.endswith("_bytes"):
        return human_bytes(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def human_bytes(n: float) -> str:
    """Sizes in the footer and tables: the planner's units, one decimal."""
    return format_bytes(n, digits=1)


def model_summary(path: Path) -> dict[str, Any]:
    """Name, family, expert quant types (most first), bits per weight (experts and overall): `lite.info.describe`."""
    from lite.info import describe

    d = describe(path)
    return {
        "name": str(d["metadata"].get("general.name") or path.stem),
        "family": d["family"],
        "expert_quant": "+".join(d["expert_types"]) or "none",
        "expert_bpw": d["expert_bits_per_weight"],
        "bpw": d["bits_per_weight"] if d["n_params"] else None,
        "size": d["file_bytes"],
    }


def experts_where(model: Any) -> str:
    """Where the routed experts live, from the backend's stats info (`model.stats()`)."""
    try:
        info = model.stats()
    except Exception:  # a backend without stats still chats
        info = {}
    device = getattr(model, "device", "cpu")
    tier, slots, n = info.get("tier"), info.get("slots_per_layer"), info.get("n_experts")
    if tier is None:
        return f"experts resident on {device}"
    if tier == "device":
        return f"all {n} experts/layer resident on {device}"
    if slots is not None and n is not None and slots >= n:
        return f"all {n} experts/layer cached on {device} (host copy in {tier})"
    k = info.get("prefetch_lookahead") or 0
    prefetch = f"prefetch {k} layer{'s' if k > 1 else ''} ahead" if k else "no prefetch"
    return f"{slots}/{n} expert slots/layer on {device}, the rest in {tier} · {prefetch}"


def header_line(path: Path, model: Any, ctx: int) -> str:
    s = model_summary(path)
    bpw = f" ({s['expert_bpw']:.2f} bits/weight)" if s["expert_bpw"] else ""
    overall = f", {s['bpw']:.2f} bpw overall" if s["bpw"] else ""
    name = s["name"] if s["family"] in s["name"] else f"{s['name']} · {s['family']}"
    return f"{name} · experts {s['expert_quant']}{bpw}{overall} · ctx {ctx} · {experts_where(model)}"
