"""Where the weights go: a plan from GGUF metadata and tensor sizes only (no weights are read).

Device: attention, norms, routers, shared experts, dense layers, embeddings and output (the "dense" bytes),
the latent cache for the context, a workspace reserve, and a cache of routed-expert slots in what is left.
Host: the routed experts, in RAM when they fit the RAM budget, else on disk (the GGUF) behind a RAM LRU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quant.errors import LiteError

GiB = 1024**3
MiB = 1024**2
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# Kept free on the device for activations, logits and the allocator's slack (prefill chunks of a few hundred
# tokens at V2 widths need ~1 GiB; a tiny model needs almost nothing, so scale with the dense bytes).
DEVICE_RESERVE_MAX = 1 * GiB
# Kept free in RAM for Python, torch and the OS when the budget is the machine's available memory.
RAM_RESERVE = 2 * GiB


def parse_size(value: int | float | str | None, what: str = "size") -> int | None:
    """Bytes from an int or a string such as "6GiB", "500MB", "1.5GiB" (accelerate's parser); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise LiteError(f"{what} must not be negative (got {value}); give bytes or a size such as 6GiB")
        return int(value)
    from accelerate.utils import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(str(value).strip().replace(" ", ""))
    except (ValueError, TypeError):
        raise LiteError(f"cannot read {what} {value!r}; give bytes or a size such as 6GiB, 512MiB, 8GB") from None
    return int(n)


def format_bytes(n: int | float) -> str:
    """1.23 GiB / 45.6 MiB / 789 KiB / 12 B."""
    n = float(n)
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def memory_bytes(qtype: Any, shape: tuple[int, ...], dtype_bytes: int = 2, device: str = "cuda") -> int:
    """Bytes a tensor takes once loaded for `device` (see `quant.qmatrix.loaded_nbytes`); 1-D tensors (norms)
    and anything QMatrix does not hold are dense values of `dtype_bytes`."""
    if len(shape) >= 2:
        from quant.qmatrix import loaded_nbytes

        return loaded_nbytes(qtype, shape, "cuda" if device.startswith("cuda") else "cpu", dtype_bytes)
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype_bytes


@dataclass
class ModelSizes:
    """What the planner needs to know about a model, from metadata and tensor types and shapes."""

    n_layers: int
    moe_layers: list[int]
    n_experts: int
    experts_per_token: int
    latent_per_token_layer: int  # kv_lora_rank + qk_rope_head_dim values
    dense_bytes: int  # every tensor that is not a routed expert, as loaded
    expert_bytes: int  # one expert (gate + up + down) as loaded: packed int4
    expert_file_bytes: int  # one expert in the GGUF (what the disk tier reads)
    context_length: int

    @property
    def expert_total(self) -> int:
        return self.expert_bytes * self.n_experts * len(self.moe_layers)

    def latent_bytes(self, ctx: int, dtype_bytes: int) -> int:
        return self.n_layers * self.latent_per_token_layer * dtype_bytes * ctx


def model_sizes(
    metadata: dict[str, Any], tensors: dict[str, Any], dtype_bytes: int = 2, device: str = "cuda"
) -> ModelSizes:
    """Sizes from llama.cpp-style `deepseek2.*` metadata and {tensor name: TensorRef-like} (`.qtype`, `.shape`
    in torch order, `.nbytes`); dense tensors are counted at `dtype_bytes` per value, as the loader makes them."""
    arch = metadata.get("general.architecture", "deepseek2")

    def key(name: str, default: Any = None) -> Any:
        v = metadata.get(f"{arch}.{name}", default)
        if v is None:
            raise LiteError(f"GGUF metadata lacks {arch}.{name}; re-convert the model with `lite convert`")
        return v

    n_experts = int(key("expert_count", 0))
    per_expert: dict[int, list[int]] = {}
    dense = 0
    for name, t in tensors.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            acc = per_expert.setdefault(int(m.group(1)), [0, 0])
            acc[0] += memory_bytes(t.qtype, tuple(t.shape), dtype_bytes, device)
            acc[1] += int(t.nbytes)
        else:
            dense += memory_bytes(t.qtype, tuple(t.shape), dtype_bytes, device)
    moe_layers = sorted(per_expert)
    mem = max((v[0] for v in per_expert.values()), default=0) // max(n_experts, 1)
    file = max((v[1] for v in per_expert.values()), default=0) // max(n_experts, 1)
    return ModelSizes(
        n_layers=int(key("block_count")),
        moe_layers=moe_layers,
        n_experts=n_experts,
        experts_per_token=int(key("expert_used_count", 0)),
        latent_per_token_layer=int(key("attention.kv_lora_rank")) + int(key("rope.dimension_count")),
        dense_bytes=dense,
        expert_bytes=mem,
        expert_file_bytes=file,
        context_length=int(key("context_length", 4096)),
    )


@dataclass
class Plan:
    """The placement, with bytes. `experts_on`: "device" (all experts in device slots), "ram" or "disk"."""

    device: str
    ctx: int
    gpu_budget: int
    ram_budget: int
    dense_bytes: int
    latent_bytes: int
    reserve_bytes: int
    expert_bytes: int
    expert_total: int
    experts_on: str
    slots_per_layer: int
    n_experts: int
    moe_layers: list[int]
    ram_expert_bytes: int  # bytes of experts held in RAM (all, or the disk tier's LRU budget)
    notes: list[str] = field(default_factory=list)

    @property
    def cache_bytes(self) -> int:
        return self.slots_per_layer * len(self.moe_layers) * self.expert_bytes

    @property
    def device_total(self) -> int:
        return self.dense_bytes + self.latent_bytes + self.reserve_bytes + self.cache_bytes

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, where, bytes) rows for a table."""
        dev = self.device
        host = {"device": "-", "ram": "RAM", "disk": "disk (GGUF) + RAM LRU"}[self.experts_on]
        rows = [
            (
                "dense weights: attention, norms, routers, shared experts, embeddings",
                dev,
                format_bytes(self.dense_bytes),
            ),
            (f"latent cache ({self.ctx} tokens)", dev, format_bytes(self.latent_bytes)),
            ("workspace reserve", dev, format_bytes(self.reserve_bytes)),
            (
                f"expert cache: {self.slots_per_layer} of {self.n_experts} slots x {len(self.moe_layers)} layers",
                dev,
                format_bytes(self.cache_bytes),
            ),
            (f"routed experts ({format_bytes(self.expert_bytes)} each)", host, format_bytes(self.expert_total)),
        ]
        if self.experts_on == "disk":
            rows.append(("RAM LRU over the disk tier", "RAM", format_bytes(self.ram_expert_bytes)))
        rows.append((f"device total (budget {format_bytes(self.gpu_budget)})", dev, format_bytes(self.device_total)))
        return rows


def default_budgets(device: str) -> tuple[int, int]:
    """(gpu_memory, ram_memory) defaults: free VRAM minus a reserve (the workspace is planned separately), and
    available RAM minus `RAM_RESERVE`. On CPU the "device" is RAM too, so it gets the RAM figure."""
    import psutil

    ram = max(psutil.virtual_memory().available - RAM_RESERVE, 0)
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(free - 256 * MiB, 0), ram
    return ram, ram


def make_plan(
    sizes: ModelSizes,
    device: str = "cpu",
    gpu_memory: int | str | None = None,
    ram_memory: int | str | None = None,
    ctx: int | None = None,
    cache_dtype_bytes: int = 2,
    experts_on: str = "auto",
    expert_cache: int | str | None = None,
) -> Plan:
    """Decide what goes where; refuse budgets that cannot be met, saying what would fit."""
    if experts_on not in ("auto", "device", "ram", "disk"):
        raise LiteError(f"experts_on must be auto, device, ram or disk (got {experts_on!r})")
    gpu = parse_size(gpu_memory, "gpu_memory")
    ram = parse_size(ram_memory, "ram_memory")
    if gpu is None or ram is None:
        dg, dr = default_budgets(device)
        gpu = dg if gpu is None else gpu
        ram = dr if ram is None else ram
    ctx = int(ctx or sizes.context_length)
    if ctx <= 0:
        raise LiteError(f"context must be positive (got {ctx})")
    reserve = min(DEVICE_RESERVE_MAX, sizes.dense_bytes // 8)
    latent = sizes.latent_bytes(ctx, cache_dtype_bytes)
    n_moe = len(sizes.moe_layers)
    fixed = sizes.dense_bytes + latent + reserve
    active = sizes.experts_per_token
    # Fewest slots that make progress: one per MoE layer (experts of a token are then run one after another).
    min_cache = n_moe * sizes.expert_bytes
    if fixed + min_cache > gpu:
        per_token = sizes.n_layers * sizes.latent_per_token_layer * cache_dtype_bytes
        room = gpu - sizes.dense_bytes - reserve - min_cache
        fits_ctx = room // per_token if per_token else 0
        hint = f"a context of at most {fits_ctx} tokens (--ctx {fits_ctx}), or " if fits_ctx >= 256 else ""
        raise LiteError(
            f"the device budget {format_bytes(gpu)} cannot hold the dense weights"
            f" ({format_bytes(sizes.dense_bytes)}) + latent cache for {ctx} tokens ({format_bytes(latent)})"
            f" + reserve ({format_bytes(reserve)}) + one expert slot per layer ({format_bytes(min_cache)});"
            f" use {hint}a device budget of at least"
            f" {format_bytes(fixed + min_cache)} (--gpu-mem)"
        )
    free_slots = (gpu - fixed) // max(sizes.expert_bytes, 1) // max(n_moe, 1)
    slots = min(int(free_slots), sizes.n_experts)
    if expert_cache is not None:
        want = _slots_from_option(expert_cache, sizes)
        if want > slots:
            raise LiteError(
                f"expert_cache of {want} slots per layer needs {format_bytes(fixed + want * min_cache)} on the device"
                f" but the budget is {format_bytes(gpu)}; use at most {slots} slots or a larger --gpu-mem"
            )
        slots = want
    notes: list[str] = []
    all_fit = slots >= sizes.n_experts
    if experts_on == "device" and not all_fit:
        need = fixed + sizes.n_experts * min_cache
        raise LiteError(
            f"experts_on=device needs {format_bytes(need)} on the device for all experts but the budget is"
            f" {format_bytes(gpu)}; use experts_on=auto (an expert cache of {slots} slots per layer) or --gpu-mem"
            f" {format_bytes(need)}"
        )
    total = sizes.expert_total
    if experts_on == "auto":
        experts_on = "device" if all_fit and expert_cache is None else ("ram" if total <= ram else "disk")
    if experts_on == "ram" and total > ram:
        raise LiteError(
            f"the routed experts need {format_bytes(total)} of RAM but the RAM budget is {format_bytes(ram)};"
            f" use experts_on=disk (a RAM LRU over the GGUF) or --ram {format_bytes(total)}"
        )
    if experts_on == "disk":
        ram_experts = min(ram, total) // max(sizes.expert_bytes, 1) * sizes.expert_bytes
        if ram_experts < 2 * active * sizes.expert_bytes:
            raise LiteError(
                f"the RAM budget {format_bytes(ram)} holds fewer than {2 * active} experts for the disk tier's LRU;"
                f" use --ram {format_bytes(2 * active * sizes.expert_bytes)} or more"
            )
        notes.append(f"experts are read from disk; the RAM LRU holds {ram_experts // sizes.expert_bytes} experts")
    elif experts_on == "ram":
        ram_experts = total
    else:
        ram_experts = 0
    if experts_on != "device" and slots < active:
        notes.append(f"{slots} expert slots per layer is fewer than the {active} active experts: expect many misses")
    return Plan(
        device=device,
        ctx=ctx,
        gpu_budget=gpu,
        ram_budget=ram,
        dense_bytes=sizes.dense_bytes,
        latent_bytes=latent,
        reserve_bytes=reserve,
        expert_bytes=sizes.expert_bytes,
        expert_total=total,
        experts_on=experts_on,
        slots_per_layer=sizes.n_experts if experts_on == "device" else slots,
        n_experts=sizes.n_experts,
        moe_layers=list(sizes.moe_layers),
        ram_expert_bytes=ram_experts,
        notes=notes,
    )


def _slots_from_option(expert_cache: int | str, sizes: ModelSizes) -> int:
    """`expert_cache`: slots per layer (an int up to n_experts) or bytes (an int above that, or a size string)."""
    if isinstance(expert_cache, int) and 0 < expert_cache <= sizes.n_experts:
        return expert_cache
    n = parse_size(expert_cache, "expert_cache")
    slots = n // max(sizes.expert_bytes * len(sizes.moe_layers), 1)
    if slots < 1:
        raise LiteError(
            f"expert_cache {expert_cache!r} is less than one slot per layer"
            f" ({format_bytes(sizes.expert_bytes * len(sizes.moe_layers))}); give slots per layer or more bytes"
        )
    return min(int(slots), sizes.n_experts)


def plan_file(path: str, device: str = "cpu", **options: Any) -> tuple[Plan, ModelSizes]:
    """Plan for a GGUF file on disk, reading its metadata and tensor sizes only."""
    from quant.gguf_file import GGUFFile

    try:
        f = GGUFFile(path)
    except FileNotFoundError:
        raise LiteError(f"no such model file: {path}") from None
    cuda = device.startswith("cuda")
    # lite's defaults: bf16 on CUDA, float32 on CPU
    sizes = model_sizes(f.metadata, f.tensors, 2 if cuda else 4, device)
    options.setdefault("cache_dtype_bytes", 2 if cuda else 4)
    return make_plan(sizes, device=device, **options), sizes
