"""Where the weights go: a plan from GGUF metadata and tensor sizes only (no weights are read).

Every count is the bytes actually allocated. Every weight keeps its GGUF bytes: on CUDA each 2-D weight sits on the
device as its GGUF blocks (the Triton kernels multiply them), so a routed expert in a device slot is its file bytes
(laid out at 16-byte-aligned offsets, `ExpertSpec`); in RAM an expert is the file's own mmap pages; the disk tier
reads it into one buffer of the slot layout. Dense exceptions, as `lite/weights.py` loads them: 1-D tensors (norms)
at the compute dtype, the routers (`ffn_gate_inp`) in float32, and the absorbed-attention factors `attn_k_b` /
`attn_v_b` (or the legacy `attn_kv_b`) dequantized to the compute dtype. The token embedding stays on the CPU as the
file's mmap (only looked-up rows are dequantized): it is RAM, never device memory.

CUDA: the device holds the dense weights, the latent cache for the context, a workspace reserve and a cache of
routed-expert slots in what is left (`gpu_memory`). The routed experts live in RAM (the mmap) when they fit
`ram_memory`, else on disk behind a RAM LRU that gets the whole `ram_memory`. The pinned staging ring that host ->
device copies go through (a few experts' bytes) is counted in RAM beside the budget, like the embedding.

CPU: the device tier is RAM, so one budget, `ram_memory`, bounds the latent cache, the expert slots and the host
tier of experts together; the dense weights, the embedding and the reserve come on top (so RAM in all stays within
`ram_memory` + dense weights (embedding included) + reserve). All experts resident (the mmap itself, no copies)
when they fit; otherwise the disk tier, where the slots take min(2 x top-k, n_experts) per layer but at most half of
what `ram_memory` leaves after the latent cache, and the RAM LRU gets the rest. `gpu_memory`, when given on CPU,
additionally caps the device tier (dense + latent + reserve + slots), as it does on CUDA.

Per-layer sizes: llama.cpp's Q4_K_M files give `ffn_down_exps` different types on different layers (Q6_K on its
"more bits" layers, Q5_0/Q8_0 where rows are not 256-aligned), so one expert's bytes differ per layer; a slot in
layer l has layer l's size, and the cache is slots x the sum over layers. `expert_bytes` is the largest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from offload.sizes import (  # noqa: F401  (re-exported: the planner's public names)
    EMBEDDING,
    EXPERT_TENSOR,
    GiB,
    MiB,
    ModelSizes,
    _align,
    format_bytes,
    gguf_nbytes,
    memory_bytes,
    model_sizes,
    parse_size,
    slot_bytes,
    tensor_bytes,
)
from quant.errors import LiteError

# Kept free on the device for activations, logits and the allocator's slack (prefill chunks of a few hundred
# tokens at V2 widths need ~1 GiB; a tiny model needs almost nothing, so scale with the dense bytes).
DEVICE_RESERVE_MAX = 1 * GiB
# Kept free in RAM for Python, torch and the OS when the budget is the machine's available memory.
RAM_RESERVE = 2 * GiB
# Kept free of the measured free VRAM when the device budget is not given.
VRAM_RESERVE = 256 * MiB
# CUDA: pinned host buffers every host -> device expert copy goes through (offload/staging.py), 8 experts in flight:
# a layer's top-6 copies and some. The engine allocates this many.
STAGING_BUFFERS = 8


@dataclass
class Plan:
    """The placement, with bytes. `experts_on`: "device" (all experts in the device tier), "ram" or "disk".

    `ram_expert_bytes` is the host tier: every expert's file bytes (the mmap) for "ram", the LRU budget for
    "disk", 0 for "device". On CPU the device tier is RAM too: `device_total` is then part of `ram_total`."""

    device: str
    ctx: int
    gpu_budget: int | None  # None: no separate device cap (CPU without gpu_memory)
    ram_budget: int
    dense_bytes: int
    latent_bytes: int
    reserve_bytes: int
    expert_bytes: int  # one expert in a slot, the largest layer's
    expert_total: int  # every expert in the host tier's form (the file's bytes)
    experts_on: str
    slots_per_layer: int
    n_experts: int
    moe_layers: list[int]
    ram_expert_bytes: int  # bytes of experts held in RAM (all, or the disk tier's LRU budget)
    notes: list[str] = field(default_factory=list)
    experts_per_token: int = 0
    expert_file_bytes: int = 0  # one expert in the file, the largest layer's
    expert_bytes_by_layer: dict[int, int] = field(default_factory=dict)
    expert_file_bytes_by_layer: dict[int, int] = field(default_factory=dict)
    embedding_bytes: int = 0  # the token embedding: the file's mmap, in RAM
    staging_bytes: int = 0  # CUDA: the pinned staging ring for host -> device copies
    cache_bytes: int = 0  # the device tier's experts: slots x sum over layers (or all resident)

    @property
    def cpu(self) -> bool:
        return not self.device.startswith("cuda")

    @property
    def device_total(self) -> int:
        return self.dense_bytes + self.latent_bytes + self.reserve_bytes + self.cache_bytes

    def ram_parts(self) -> dict[str, int]:
        """RAM by part. On CPU the device tier (dense, latent cache, reserve, expert slots) is RAM as well."""
        cpu = self.cpu
        return {
            "experts": self.ram_expert_bytes,
            "expert_cache": self.cache_bytes if cpu else 0,
            "latent_cache": self.latent_bytes if cpu else 0,
            "staging": self.staging_bytes,
            "dense": self.dense_bytes if cpu else 0,
            "embedding": self.embedding_bytes,
            "reserve": self.reserve_bytes if cpu else 0,
        }

    @property
    def ram_budgeted(self) -> int:
        """The part of RAM that `ram_memory` bounds (all but the dense weights, embedding, reserve and staging)."""
        p = self.ram_parts()
        return p["experts"] + p["expert_cache"] + p["latent_cache"]

    @property
    def ram_total(self) -> int:
        return sum(self.ram_parts().values())

    def ram_bytes_per_expert(self, layer: int) -> int:
        """One expert of `layer` in RAM under this plan: a disk-tier LRU buffer (the slot layout), else the file's
        mmap pages (the RAM tier, and CPU experts all resident)."""
        if self.experts_on == "disk":
            return self.expert_bytes_by_layer.get(layer, self.expert_bytes)
        return self.expert_file_bytes_by_layer.get(layer, self.expert_file_bytes)

    def to_json(self) -> dict[str, Any]:
        """The plan as one JSON-able object, what `lite plan --json` prints (all sizes are integer bytes):

        - `device`, `ctx`, `experts_on` ("device" | "ram" | "disk"), `slots_per_layer` (device slots per MoE layer;
          n_experts when all are on the device), `n_experts`, `experts_per_token`, `moe_layers` (layer indices).
        - `bytes_per_expert_file` / `_ram` / `_device`: one routed expert (gate + up + down) of the LARGEST MoE
          layer (the maximum over layers: Q4_K_M files type ffn_down_exps differently per layer) in the GGUF; in RAM
          under this plan (the RAM tier and CPU all-resident experts are the file's mmap pages, i.e. the file's
          bytes; the disk tier's LRU holds one buffer in the slot layout); in a device slot (the GGUF blocks at
          16-byte-aligned offsets).
        - `bytes_per_expert_mean`: {file, ram, device}, the same averaged over the MoE layers (float);
          `bytes_per_expert_by_layer`: {"<layer>": {file, ram, device}}.
        - `budgets`: {gpu_memory (null: no device cap, CPU only), ram_memory}.
        - `device_bytes`: {dense (every weight but the routed experts and the token embedding, as loaded on the
          compute device), latent_cache, reserve, expert_cache (slots x the sum over layers of that layer's expert
          bytes; every expert when experts_on is "device"), total, budget}. On CPU the device tier is RAM.
        - `ram_bytes`: {experts (the host tier: every expert's file bytes for "ram", the LRU budget for "disk", 0 for
          "device"), expert_cache, latent_cache, dense, reserve (the device tier, CPU only; 0 on CUDA), staging
          (CUDA: the pinned ring host -> device copies go through), embedding (the token embedding: the file's
          mmap), total, budgeted (the part `ram_memory` bounds: experts, and on CPU also expert_cache +
          latent_cache), budget (ram_memory)}.
        - `disk_bytes`: {experts: every expert's file bytes when they are read from disk, else 0}.
        - `notes`: list of strings.
        """
        layers = list(self.moe_layers)
        by_layer = {
            str(i): {
                "file": self.expert_file_bytes_by_layer.get(i, self.expert_file_bytes),
                "ram": self.ram_bytes_per_expert(i),
                "device": self.expert_bytes_by_layer.get(i, self.expert_bytes),
            }
            for i in layers
        }

        def largest(kind: str) -> int:
            return max((v[kind] for v in by_layer.values()), default=0)

        def mean(kind: str) -> float:
            return sum(v[kind] for v in by_layer.values()) / max(len(by_layer), 1)

        ram = self.ram_parts()
        ram.update(total=self.ram_total, budgeted=self.ram_budgeted, budget=self.ram_budget)
        return {
            "device": self.device,
            "ctx": self.ctx,
            "experts_on": self.experts_on,
            "slots_per_layer": self.slots_per_layer,
            "n_experts": self.n_experts,
            "experts_per_token": self.experts_per_token,
            "moe_layers": layers,
            "bytes_per_expert_file": largest("file"),
            "bytes_per_expert_ram": largest("ram"),
            "bytes_per_expert_device": largest("device"),
            "bytes_per_expert_mean": {k: mean(k) for k in ("file", "ram", "device")},
            "bytes_per_expert_by_layer": by_layer,
            "budgets": {"gpu_memory": self.gpu_budget, "ram_memory": self.ram_budget},
            "device_bytes": {
                "dense": self.dense_bytes,
                "latent_cache": self.latent_bytes,
                "reserve": self.reserve_bytes,
                "expert_cache": self.cache_bytes,
                "total": self.device_total,
                "budget": self.gpu_budget,
            },
            "ram_bytes": ram,
            "disk_bytes": {"experts": self.expert_total if self.experts_on == "disk" else 0},
            "notes": list(self.notes),
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, where, bytes) rows for a table."""
        dev = "cpu (RAM)" if self.cpu else self.device
        host = {"device": dev, "ram": "RAM (the file's mmap)", "disk": "disk (GGUF) + RAM LRU"}[self.experts_on]
        n_layers = len(self.moe_layers)
        sizes = set(self.expert_bytes_by_layer.values()) or {self.expert_bytes}
        each = format_bytes(max(sizes)) if len(sizes) == 1 else f"{format_bytes(min(sizes))}-{format_bytes(max(sizes))}"
        if self.experts_on == "device":
            cache_what = f"routed experts, all {self.n_experts} x {n_layers} layers resident"
        else:
            cache_what = f"expert cache: {self.slots_per_layer} of {self.n_experts} slots x {n_layers} layers"
        rows = [
            ("dense weights: attention, norms, routers, shared experts, dense FFN, output", dev,
             format_bytes(self.dense_bytes)),
            ("token embedding (the file's mmap; looked-up rows only)", "RAM", format_bytes(self.embedding_bytes)),
            (f"latent cache ({self.ctx} tokens)", dev, format_bytes(self.latent_bytes)),
            ("workspace reserve", dev, format_bytes(self.reserve_bytes)),
            (f"{cache_what} ({each} per expert)", dev, format_bytes(self.cache_bytes)),
        ]  # fmt: skip
        if self.experts_on != "device":
            file_each = format_bytes(self.expert_file_bytes)
            rows.append((f"routed experts (up to {file_each} each in the file)", host, format_bytes(self.expert_total)))
        if self.experts_on == "disk":
            rows.append(("RAM LRU over the disk tier", "RAM", format_bytes(self.ram_expert_bytes)))
        if self.staging_bytes:
            rows.append(("pinned staging for host -> device copies", "RAM", format_bytes(self.staging_bytes)))
        budget = "no separate cap" if self.gpu_budget is None else f"budget {format_bytes(self.gpu_budget)}"
        rows.append((f"device total ({budget})", dev, format_bytes(self.device_total)))
        rows.append(
            (f"RAM total ({format_bytes(self.ram_budgeted)} of the {format_bytes(self.ram_budget)} RAM budget)",
             "RAM", format_bytes(self.ram_total))
        )  # fmt: skip
        return rows


def default_ram() -> int:
    """Available RAM minus `RAM_RESERVE` (psutil; works on any machine)."""
    import psutil

    return max(psutil.virtual_memory().available - RAM_RESERVE, 0)


def default_gpu(device: str) -> int:
    """Free VRAM on `device` minus `VRAM_RESERVE` (the workspace is planned separately). Without a GPU there is
    nothing to measure: a one-line `LiteError` asks for the budget."""
    import torch

    if not torch.cuda.is_available():
        raise LiteError(
            f"planning for {device} on a machine without a CUDA device needs the device budget: give gpu_memory"
            ", e.g. 24GiB"
        )
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(free - VRAM_RESERVE, 0)


def default_budgets(device: str) -> tuple[int, int]:
    """(gpu_memory, ram_memory) defaults: free VRAM minus a reserve, and available RAM minus `RAM_RESERVE`. On CPU
    the "device" is RAM too, so it gets the RAM figure (make_plan then uses ram_memory as the one budget)."""
    ram = default_ram()
    return (default_gpu(device) if device.startswith("cuda") else ram), ram


def _ctx_hint(sizes: ModelSizes, room: int, cache_dtype_bytes: int) -> str:
    """ "a context of at most N tokens (ctx=N), or " when `room` bytes hold a useful context."""
    per_token = sizes.n_layers * sizes.latent_per_token_layer * cache_dtype_bytes
    fits = room // per_token if per_token else 0
    return f"a context of at most {fits} tokens (ctx={fits}), or " if fits >= 256 else ""


@dataclass
class _Budget:
    """The numbers every placement decision uses (bytes)."""

    sizes: ModelSizes
    ctx: int
    gpu: int | None  # the device cap (None: none, CPU only)
    ram: int
    want: int | None  # slots per layer asked for (expert_cache), or None
    cache_dtype_bytes: int

    def __post_init__(self) -> None:
        s = self.sizes
        self.n, self.k = s.n_experts, max(s.experts_per_token, 1)
        self.reserve = min(DEVICE_RESERVE_MAX, s.dense_bytes // 8)
        self.latent = s.latent_bytes(self.ctx, self.cache_dtype_bytes)
        self.fixed = s.dense_bytes + self.latent + self.reserve  # the device tier before any expert
        self.slot_set = max(s.slot_set_bytes, 1)  # one slot in every MoE layer
        self.file_all = s.expert_file_total  # every expert as the file's bytes (the RAM tier: the mmap)
        self.lru_all = s.n_experts * s.slot_set_bytes  # every expert in disk-tier buffers
        self.lru_min = 2 * self.k * max(s.expert_bytes, 1)  # the smallest useful disk-tier LRU
        self.gpu_slots = self.n if self.gpu is None else min((self.gpu - self.fixed) // self.slot_set, self.n)

    def check_device(self) -> None:
        """The device tier must hold the dense weights, the latent cache, the reserve and one slot per layer."""
        if self.gpu is None or self.fixed + self.slot_set <= self.gpu:
            return
        s = self.sizes
        hint = _ctx_hint(s, self.gpu - s.dense_bytes - self.reserve - self.slot_set, self.cache_dtype_bytes)
        raise LiteError(
            f"the device budget {format_bytes(self.gpu)} cannot hold the dense weights ({format_bytes(s.dense_bytes)})"
            f" + latent cache for {self.ctx} tokens ({format_bytes(self.latent)}) + reserve"
            f" ({format_bytes(self.reserve)}) + one expert slot per layer ({format_bytes(self.slot_set)}); use"
            f" {hint}a device budget of at least {format_bytes(self.fixed + self.slot_set)} (gpu_memory)"
        )


# (experts_on, slots per layer, host-tier expert bytes, device-tier expert bytes, pinned staging bytes)
_Placement = tuple[str, int, int, int, int]


def _place_cuda(b: _Budget, experts_on: str) -> _Placement:
    """CUDA: slots in what the device budget leaves; experts in RAM (the mmap) when they fit, else the disk tier
    behind a RAM LRU of the whole RAM budget. The staging ring is RAM beside the budget."""
    assert b.gpu is not None
    staging = STAGING_BUFFERS * _align(b.sizes.expert_bytes)
    slots = b.gpu_slots
    if b.want is not None:
        if b.want > slots:
            raise LiteError(
                f"expert_cache of {b.want} slots per layer needs {format_bytes(b.fixed + b.want * b.slot_set)} on"
                f" the device but the budget is {format_bytes(b.gpu)}; use at most {slots} slots or a larger gpu_memory"
            )
        slots = b.want
    all_fit = b.gpu_slots >= b.n
    if experts_on == "device" and not all_fit:
        need = b.fixed + b.n * b.slot_set
        raise LiteError(
            f"experts_on=device needs {format_bytes(need)} on the device for all experts but the budget is"
            f" {format_bytes(b.gpu)}; use experts_on=auto (an expert cache of {slots} slots per layer) or"
            f" gpu_memory {format_bytes(need)}"
        )
    if experts_on == "auto":
        experts_on = "device" if all_fit and b.want is None else ("ram" if b.file_all <= b.ram else "disk")
    if experts_on == "device":
        return "device", b.n, 0, b.n * b.slot_set, 0
    if experts_on == "ram":
        if b.file_all > b.ram:
            raise LiteError(
                f"the routed experts need {format_bytes(b.file_all)} of RAM but the RAM budget is"
                f" {format_bytes(b.ram)}; use experts_on=disk (a RAM LRU over the GGUF) or ram_memory"
                f" {format_bytes(b.file_all)}"
            )
        return "ram", slots, b.file_all, slots * b.slot_set, staging
    lru = min(b.ram, b.lru_all)
    if lru < b.lru_min:
        raise LiteError(
            f"the RAM budget {format_bytes(b.ram)} holds fewer than {2 * b.k} experts ({format_bytes(b.lru_min)}) for"
            f" the disk tier's LRU; use ram_memory {format_bytes(b.lru_min)} or more"
        )
    return "disk", slots, lru, slots * b.slot_set, staging


def _place_cpu(b: _Budget, experts_on: str) -> _Placement:
    """CPU: the latent cache, the slots and the host tier share `ram`. All experts resident (the mmap, no copies)
    when they fit; else the disk tier: min(2 x top-k, n) slots per layer, at most half of what the latent cache
    leaves, and the LRU gets the rest. An explicit "ram" keeps the mmap behind min(2 x top-k, n) slots."""
    room = b.ram - b.latent  # for experts
    least = min(b.file_all, b.slot_set + b.lru_min)  # all resident, or one slot per layer + the smallest LRU
    if room < least:
        hint = _ctx_hint(b.sizes, b.ram - least, b.cache_dtype_bytes)
        raise LiteError(
            f"the RAM budget {format_bytes(b.ram)} cannot hold the latent cache for {b.ctx} tokens"
            f" ({format_bytes(b.latent)}) + the least the experts need ({format_bytes(least)}: one slot per layer and"
            f" a disk-tier LRU of {2 * b.k} experts); use {hint}a RAM budget of at least"
            f" {format_bytes(b.latent + least)} (ram_memory)"
        )
    device_fits = b.file_all <= room and (b.gpu is None or b.fixed + b.file_all <= b.gpu)
    cap = "" if b.gpu is None else f" (device cap {format_bytes(b.gpu)})"
    if experts_on == "device" and not device_fits:
        if b.gpu is not None and b.fixed + b.file_all > b.gpu:  # the optional device cap is what does not fit
            need = b.fixed + b.file_all
            raise LiteError(
                f"experts_on=device needs {format_bytes(need)} in the device tier for the dense weights, the latent"
                f" cache, the reserve and all experts but gpu_memory caps it at {format_bytes(b.gpu)}; use"
                f" experts_on=auto or gpu_memory {format_bytes(need)}"
            )
        need = b.latent + b.file_all
        raise LiteError(
            f"experts_on=device needs {format_bytes(need)} of the RAM budget for the latent cache and all experts but"
            f" it is {format_bytes(b.ram)}; use experts_on=auto (the disk tier) or ram_memory {format_bytes(need)}"
        )
    least_slots = b.want or 1
    ram_slots = min((room - b.file_all) // b.slot_set, b.gpu_slots) if room >= b.file_all else 0
    if experts_on == "auto":
        if device_fits and b.want is None:
            experts_on = "device"
        else:
            experts_on = "ram" if ram_slots >= least_slots else "disk"
    target = b.want if b.want is not None else min(2 * b.k, b.n)
    if experts_on == "device":
        return "device", b.n, 0, b.file_all, 0  # the mmap views themselves
    if experts_on == "ram":
        if ram_slots < least_slots:
            need = b.latent + b.file_all + least_slots * b.slot_set
            raise LiteError(
                f"experts_on=ram on the CPU needs {format_bytes(need)} of the RAM budget (latent cache, all experts,"
                f" {least_slots} slots per layer) but it is {format_bytes(b.ram)}{cap}; use experts_on=disk or"
                f" ram_memory {format_bytes(need)}"
            )
        slots = min(target, ram_slots)
        return "ram", slots, b.file_all, slots * b.slot_set, 0
    fit = min((room - b.lru_min) // b.slot_set, b.gpu_slots)  # the most slots beside the smallest LRU
    if fit < least_slots:
        need = b.latent + least_slots * b.slot_set + b.lru_min
        raise LiteError(
            f"the RAM budget {format_bytes(b.ram)}{cap} cannot hold the latent cache for {b.ctx} tokens"
            f" ({format_bytes(b.latent)}) + {least_slots} expert slots per layer"
            f" ({format_bytes(least_slots * b.slot_set)}) + a disk-tier LRU of {2 * b.k} experts"
            f" ({format_bytes(b.lru_min)}); use ram_memory {format_bytes(need)} or more"
        )
    slots = b.want if b.want is not None else max(min(target, room // 2 // b.slot_set, fit), 1)
    cache = slots * b.slot_set
    return "disk", slots, min(room - cache, b.lru_all), cache, 0


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
    """Decide what goes where (see the module docstring); refuse budgets that cannot be met, in one line that
    names the numbers and what would fit."""
    if experts_on not in ("auto", "device", "ram", "disk"):
        raise LiteError(f"experts_on must be auto, device, ram or disk (got {experts_on!r})")
    cuda = device.startswith("cuda")
    gpu = parse_size(gpu_memory, "gpu_memory")
    ram = parse_size(ram_memory, "ram_memory")
    notes: list[str] = []
    if cuda and gpu is None:
        gpu = default_gpu(device)
        notes.append(f"device budget: free VRAM minus {format_bytes(VRAM_RESERVE)} = {format_bytes(gpu)}")
    if ram is None:
        ram = default_ram()
        notes.append(f"RAM budget: available RAM minus {format_bytes(RAM_RESERVE)} = {format_bytes(ram)}")
    ctx = int(ctx or sizes.context_length)
    if ctx <= 0:
        raise LiteError(f"context must be positive (got {ctx})")
    want = None if expert_cache is None else _slots_from_option(expert_cache, sizes)
    b = _Budget(sizes, ctx, gpu, ram, want, cache_dtype_bytes)
    b.check_device()
    experts_on, slots, ram_experts, cache, staging = (_place_cuda if cuda else _place_cpu)(b, experts_on)
    if experts_on == "disk":
        held = ram_experts * len(sizes.moe_layers) // b.slot_set
        notes.append(f"experts are read from disk; the RAM LRU holds {format_bytes(ram_experts)} (~{held} experts)")
    if experts_on != "device" and slots < b.k:
        notes.append(f"{slots} expert slots per layer is fewer than the {b.k} active experts: expect many misses")
    return Plan(
        device=device,
        ctx=ctx,
        gpu_budget=gpu,
        ram_budget=ram,
        dense_bytes=sizes.dense_bytes,
        latent_bytes=b.latent,
        reserve_bytes=b.reserve,
        expert_bytes=sizes.expert_bytes,
        expert_total=b.file_all,
        experts_on=experts_on,
        slots_per_layer=slots,
        n_experts=b.n,
        moe_layers=list(sizes.moe_layers),
        ram_expert_bytes=ram_experts,
        notes=notes,
        experts_per_token=sizes.experts_per_token,
        expert_file_bytes=sizes.expert_file_bytes,
        expert_bytes_by_layer={i: sizes.layer_bytes(i) for i in sizes.moe_layers},
        expert_file_bytes_by_layer={i: sizes.layer_file_bytes(i) for i in sizes.moe_layers},
        embedding_bytes=sizes.embedding_bytes,
        staging_bytes=staging,
        cache_bytes=cache,
    )


def _slots_from_option(expert_cache: int | str, sizes: ModelSizes) -> int:
    """`expert_cache`: slots per layer (an int up to n_experts) or bytes (an int above that, or a size string)."""
    if isinstance(expert_cache, int) and 0 < expert_cache <= sizes.n_experts:
        return expert_cache
    n = parse_size(expert_cache, "expert_cache") or 0
    slots = n // max(sizes.slot_set_bytes, 1)
    if slots < 1:
        raise LiteError(
            f"expert_cache {expert_cache!r} is less than one slot per layer"
            f" ({format_bytes(sizes.slot_set_bytes)}); give slots per layer or more bytes"
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
