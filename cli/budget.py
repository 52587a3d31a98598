"""One context and budget story for every command (chat, run, bench, perplexity, plan).

- The context defaults to min(4096, the model's) and is settled before any budget is checked; a context
  beyond the model's is an error everywhere, naming the flag.
- Sizes (--gpu-mem, --ram, --expert-cache) are plain bytes or a number with K/M/G/T and iB (powers of 1024) or
  B (powers of 1000); they reach the library as ints.
- --expert-cache N (digits) is N slots per MoE layer; a size is a byte budget for them.
- --ram smaller than the routed experts means the disk tier, unless --experts-on says otherwise.
- Errors from the planner are reworded with the flags the user typed.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from pathlib import Path
from typing import Any

from lite.errors import LiteError
from offload import sizes
from offload.policy import check_miss_policy
from offload.sizes import DEFAULT_CTX

MIN_CTX = 8
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(I?)B|B)?$")
# the planner's and the engine's option names -> the CLI's flags
_FLAGS = [
    (re.compile(r"\bexperts_on=(\w+)"), r"--experts-on \1"),
    (re.compile(r"\bexperts_on\b"), "--experts-on"),
    (re.compile(r"\bexpert_cache\b"), "--expert-cache"),
    (re.compile(r"\bram_memory\b"), "--ram"),
    (re.compile(r"\bgpu_memory\b"), "--gpu-mem"),
    (re.compile(r"\bmiss_policy\b"), "--miss-policy"),
    (re.compile(r"^prefetch must\b"), "--prefetch must"),
]


def parse_size(text: str | None, flag: str) -> int | None:
    """Bytes from "1048576", "512MiB", "1.5 GiB", "8GB" (K/M/G/T with iB: 1024-based, with B: 1000-based)."""
    return None if text is None else sizes.parse_size(str(text), flag)


def flag_names(message: str, ctx_flag: str = "-c") -> str:
    """A library message with option names replaced by the CLI flags (and "(ctx=N)" by `ctx_flag` N)."""
    for pattern, flag in _FLAGS:
        message = pattern.sub(flag, message)
    return re.sub(r"\(ctx=(\d+)\)", rf"({ctx_flag} \1)", message)


def resolve_ctx(requested: int | None, limit: int, flag: str, default: int = DEFAULT_CTX) -> int:
    """The context to plan and run with: `requested`, or min(`default`, the model's) when None; an error
    beyond the model's context (`limit`) or below MIN_CTX."""
    if requested is None:
        return min(default, limit)
    if requested < MIN_CTX:
        raise LiteError(f"{flag} {requested} is too small; use at least {MIN_CTX} tokens")
    if requested > limit:
        raise LiteError(f"{flag} {requested} exceeds the model's context of {limit} tokens; use {limit} or less")
    return requested


def planner_device(device: str | None) -> str:
    """'cuda' or 'cpu' for the planner ("auto": CUDA when present)."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_sizes(path: Path | str, device: str) -> Any:
    """The planner's view of a GGUF (metadata and tensor sizes only), for the compute dtype lite.load uses."""
    from offload.planner import model_sizes as sizes_of

    f = _gguf(str(path))
    cuda = device.startswith("cuda")
    return sizes_of(f.metadata, f.tensors, 2 if cuda else 4, "cuda" if cuda else "cpu")


def _gguf(path: str) -> Any:
    """The GGUF's header, parsed once for the several questions a command asks before loading (again if the file
    changed)."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:  # GGUFFile says what is wrong with the path
        stamp = None
    return _parsed(path, stamp)


@functools.lru_cache(maxsize=1)
def _parsed(path: str, stamp: tuple[int, int] | None) -> Any:
    from quant.gguf_file import GGUFFile

    return GGUFFile(path)


def cache_dtype_bytes(path: Path | str, device: str, dtype: Any = None) -> int:
    """Bytes per latent-cache value: `dtype`'s, else what lite.load would choose for this file on `device`."""
    from lite.cache import default_cache_dtype, is_quantized

    if dtype is not None:
        return int(dtype.itemsize)
    cuda = device.startswith("cuda")
    return default_cache_dtype("cuda" if cuda else "cpu", quantized=is_quantized(_gguf(str(path)).tensors)).itemsize


def expert_slots(value: str, sizes: Any) -> int:
    """--expert-cache: digits are slots per MoE layer (1..n_experts); a size is bytes, turned into slots."""
    n = sizes.n_experts
    if value.strip().isdigit():
        slots = int(value)
        if not 1 <= slots <= n:
            raise LiteError(
                f"--expert-cache {value} slots is out of range: this model has {n} experts per layer; give 1 to {n}"
                " slots, or a size such as 2GiB"
            )
        return slots
    from offload.planner import format_bytes

    per_slot = sizes.slot_set_bytes  # one slot in every MoE layer, each at its layer's size
    slots = parse_size(value, "--expert-cache") // max(per_slot, 1)
    if slots < 1:
        raise LiteError(
            f"--expert-cache {value} is less than one expert slot per layer ({format_bytes(per_slot)}); give slots"
            " per layer or a larger size"
        )
    return min(int(slots), n)


def offload_options(args: argparse.Namespace, sizes: Any) -> dict[str, Any]:
    """lite.load keyword options from the flags (only those given, so the loader's defaults apply), as ints."""
    opts: dict[str, Any] = {}
    gpu, ram = parse_size(args.gpu_mem, "--gpu-mem"), parse_size(args.ram, "--ram")
    if gpu is not None:
        opts["gpu_memory"] = gpu
    if ram is not None:
        opts["ram_memory"] = ram
    experts_on = getattr(args, "experts_on", None)
    if experts_on in (None, "auto") and ram is not None and sizes.moe_layers and ram < sizes.expert_total:
        experts_on = "disk"  # as the README says: a RAM budget smaller than the experts means the disk tier
    if experts_on:
        opts["experts_on"] = experts_on
    if args.expert_cache is not None and sizes.moe_layers:
        opts["expert_cache"] = expert_slots(args.expert_cache, sizes)
    policy = getattr(args, "miss_policy", None)
    if policy:
        try:
            opts["miss_policy"] = check_miss_policy(policy)
        except LiteError as e:
            raise LiteError(flag_names(str(e))) from None
    prefetch = getattr(args, "prefetch", None)
    if prefetch is not None:
        value = prefetch.lower()
        if value in ("on", "true", "yes"):
            opts["prefetch"] = True
        elif value in ("off", "false", "no", "0"):
            opts["prefetch"] = False
        elif value.isdigit():
            opts["prefetch"] = int(value)
        else:
            raise LiteError(f"--prefetch takes on, off or a number of layers, got {prefetch!r}")
    return opts
