"""Flags, model loading and rendering shared by chat, run, bench and perplexity."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lite.errors import LiteError
from lite.sampling import SamplingParams

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "lite" / "data" / "demo.gguf"
DEFAULTS = SamplingParams()
DEFAULT_CTX = 4096
DEFAULT_MAX_TOKENS = 512


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", metavar="MODEL", help="a .gguf file (default: the bundled demo model lite/data/demo.gguf)"
    )


# flag -> (SamplingParams field, GGUF key with the model's recommended value, as llama.cpp reads it)
SAMPLING_FLAGS = {
    "temp": ("temperature", "general.sampling.temp"),
    "top_k": ("top_k", "general.sampling.top_k"),
    "top_p": ("top_p", "general.sampling.top_p"),
    "min_p": ("min_p", "general.sampling.min_p"),
    "repeat_penalty": ("repeat_penalty", "general.sampling.penalty_repeat"),
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


def add_context_arg(p: argparse.ArgumentParser, default: int | None = DEFAULT_CTX) -> None:
    p.add_argument(
        "-c", "--ctx-size", type=int, default=default, metavar="N",
        help="context length in tokens (default: %(default)s, at most the model's)",
    )  # fmt: skip


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory (where the routed experts live; see `lite plan`)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (%(default)s)")
    g.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's, the cores)")
    g.add_argument("--gpu-mem", metavar="SIZE", help="device memory budget, e.g. 6GiB (default: free memory - reserve)")
    g.add_argument(
        "--ram", metavar="SIZE", help="RAM budget for experts, e.g. 8GiB; smaller than the experts = disk tier"
    )
    g.add_argument(
        "--experts-on", choices=["auto", "device", "ram", "disk"], default=None,
        help="where experts are kept: all on the device, in RAM, or read from the file (default: auto, planned)",
    )  # fmt: skip
    g.add_argument(
        "--expert-cache", metavar="N|SIZE", default=None,
        help="device expert cache: slots per MoE layer, or a byte budget such as 2GiB (default: planned)",
    )  # fmt: skip
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
    """Flags first, then the model's recommended values (GGUF `general.sampling.*`), then lite's defaults.
    Call it once without metadata before loading, to reject bad flags early."""
    md = metadata or {}
    params = SamplingParams(seed=args.seed)
    for flag, (field, key) in SAMPLING_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            value = md.get(key, getattr(params, field))
        elif value < 0 or math.isnan(value):
            raise LiteError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
        setattr(params, field, type(getattr(params, field))(value))
    if "general.sampling.penalty_last_n" in md:
        params.repeat_last_n = int(md["general.sampling.penalty_last_n"])
    if not 0 <= params.top_p <= 1 or not 0 <= params.min_p <= 1:
        raise LiteError("--top-p and --min-p must lie between 0 and 1")
    if args.max_tokens < 1:
        raise LiteError(f"-n/--max-tokens must be at least 1, got {args.max_tokens}")
    return params


def offload_options(args: argparse.Namespace) -> dict[str, Any]:
    """lite.load keyword options from the flags (only those given, so the loader's defaults apply)."""
    opts: dict[str, Any] = {}
    if getattr(args, "ctx_size", None):
        opts["ctx"] = args.ctx_size  # the planner sizes the latent cache for it
    if args.gpu_mem:
        opts["gpu_memory"] = args.gpu_mem
    if args.ram:
        opts["ram_memory"] = args.ram
    if args.experts_on:
        opts["experts_on"] = args.experts_on
    if args.expert_cache is not None:
        opts["expert_cache"] = int(args.expert_cache) if args.expert_cache.isdigit() else args.expert_cache
    if args.miss_policy:
        if args.miss_policy not in ("auto", "fetch", "cpu"):
            raise LiteError(f"--miss-policy takes auto, fetch or cpu, got {args.miss_policy!r}")
        opts["miss_policy"] = args.miss_policy
    if args.prefetch is not None:
        value = args.prefetch.lower()
        if value in ("on", "true", "yes"):
            opts["prefetch"] = True
        elif value in ("off", "false", "no", "0"):
            opts["prefetch"] = False
        elif value.isdigit():
            opts["prefetch"] = int(value)
        else:
            raise LiteError(f"--prefetch takes on, off or a number of layers, got {args.prefetch!r}")
    return opts


def resolve_model(path: str | None) -> Path:
    if path is None:
        if DEFAULT_MODEL.is_file():
            return DEFAULT_MODEL
        raise LiteError(
            "no MODEL given and the bundled demo model is missing; convert one with "
            "`lite convert HF_DIR -o model.gguf` (e.g. DeepSeek-V2-Lite-Chat) and pass model.gguf"
        )
    p = Path(path)
    if not p.is_file():
        raise LiteError(f"model file not found: {path}; pass the path of a .gguf file")
    return p


def load_model(args: argparse.Namespace, console: Console, ctx: int | None = None) -> tuple[Any, Path]:
    """Resolve MODEL and load it quietly, with a spinner on a terminal. `ctx` overrides -c for planning."""
    import lite

    path = resolve_model(args.model)
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise LiteError(f"-t/--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = offload_options(args)
    if ctx:
        options["ctx"] = ctx
    with console.status(f"loading {path.name} …", spinner="dots"):
        model = lite.load(str(path), device=args.device, **options)
    return model, path


def context_size(args: argparse.Namespace, model: Any) -> int:
    limit = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "context_length", 0) or 0)
    ctx = args.ctx_size
    if ctx is not None and ctx < 8:
        raise LiteError(f"-c/--ctx-size {ctx} is too small; use at least 8 tokens")
    if ctx is None:
        ctx = min(DEFAULT_CTX, limit) if limit else DEFAULT_CTX
    return min(ctx, limit) if limit else ctx


def stat_value(key: str, value: Any) -> str:
    """One `model.stats()` figure for a table: sizes in bytes humanised, ratios with 3 digits, None as n/a."""
    if value is None:
        return "n/a"
    if key.startswith("bytes") or key.endswith("_bytes"):
        return human_bytes(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def model_summary(path: Path) -> dict[str, Any]:
    """Name, family, dominant expert quant type, bits per weight (experts and overall) from the GGUF's tensor table."""
    from collections import Counter

    from lite.info import family
    from quant.gguf_file import GGUFFile

    f = GGUFFile(str(path))
    expert_types: Counter[str] = Counter()
    bits = numel = ebits = enumel = 0
    for t in f.tensors.values():
        n = math.prod(t.shape)
        bits, numel = bits + 8 * t.nbytes, numel + n
        if "_exps." in t.name:
            expert_types[t.qtype.name] += n
            ebits, enumel = ebits + 8 * t.nbytes, enumel + n
    return {
        "name": str(f.metadata.get("general.name") or path.stem),
        "family": family(f.metadata),
        "expert_quant": "+".join(q for q, _ in expert_types.most_common()) or "none",
        "expert_bpw": ebits / enumel if enumel else None,
        "bpw": bits / numel if numel else None,
        "size": path.stat().st_size,
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
