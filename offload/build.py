"""`build_experts`: the expert backend for a model, from its expert stacks and the memory options (docs/DESIGN.md).

Options (the same names as the CLI flags):
- `gpu_memory`: device budget, bytes or a size string ("6GiB"); default free VRAM minus a reserve (on CPU:
  available RAM). Dense weights, the latent cache and a workspace reserve come first; expert slots get the rest.
- `ram_memory`: RAM budget for the host tier; default available RAM minus 2 GiB.
- `experts_on`: "auto" (the planner decides), "device" (every expert resident in the device tier), "ram"
  (all experts in RAM, a device LRU cache of slots), "disk" (the GGUF read on demand behind a RAM LRU).
- `expert_cache`: device slots per MoE layer (an int up to n_experts) or a byte budget for them.
- `prefetch`: True (lookahead 1 layer), False, or a lookahead in layers: as each layer finishes, the gate of
  the next layer(s) applied to its output ranks their experts, and the likeliest (as many as a layer has
  slots) start copying in before they are needed.
- `miss_policy`: "fetch" (copy the missing expert in, wait, compute on the device), "cpu" (compute it on the
  CPU from the host copy), or "auto" (per miss, whichever the measured copy and CPU times say is faster).
- `ctx`: context to plan the latent cache for (default DEFAULT_CTX, 4096); `gguf_file` (passed by `lite.load`): lets the
  planner count the dense weights and the latent cache too; `cache_scope`: "layer" (default: each layer has
  its own slots) or "global" (one LRU over all slots); `drop_page_cache`: make disk-tier reads bypass the OS
  page cache (for honest benchmarks); `async_prefetch` (default: on CUDA): predicted ids reach the host without
  blocking the forward pass, and the worker thread issues the prefetch copies; `prefetch_width`: the likeliest
  experts a prediction may bring into a layer (default 2 x top-k, at most the slots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from offload.backend import ExpertBackend
from offload.policy import check_miss_policy
from offload.sizes import DEFAULT_CTX
from quant.errors import LiteError


def _lookahead(prefetch: bool | int) -> int:
    if isinstance(prefetch, bool):
        return 1 if prefetch else 0
    if isinstance(prefetch, int) and prefetch >= 0:
        return prefetch
    raise LiteError(f"prefetch must be True, False or a lookahead in layers (got {prefetch!r})")


def sizes_from_stacks(stacks: dict) -> Any:
    """Planner sizes when only the expert stacks are known (no dense weights, no latent cache): every tier holds
    an expert as its GGUF bytes, in a slot laid out by its layer's `ExpertSpec`."""
    from offload.experts import raw_nbytes, spec_of
    from offload.planner import ModelSizes

    per_layer = {layer: spec_of(st).nbytes for layer, st in stacks.items()}
    in_file = {layer: raw_nbytes(st) for layer, st in stacks.items()}
    return ModelSizes(
        n_layers=max(stacks) + 1,
        moe_layers=sorted(stacks),
        n_experts=next(iter(stacks.values())).gate.shape[0],
        experts_per_token=1,
        latent_per_token_layer=0,
        dense_bytes=0,
        expert_bytes=max(per_layer.values()),
        expert_file_bytes=max(in_file.values()),
        context_length=DEFAULT_CTX,
        expert_bytes_by_layer=per_layer,
        expert_file_bytes_by_layer=in_file,
    )


def build_experts(
    stacks: dict,
    predict: Callable[[int, torch.Tensor, int], torch.Tensor] | None,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    gpu_memory: int | str | None = None,
    ram_memory: int | str | None = None,
    experts_on: str = "auto",
    expert_cache: int | str | None = None,
    prefetch: bool | int = True,
    miss_policy: str = "auto",
    ctx: int | None = None,
    model_sizes: Any = None,
    gguf_file: Any = None,
    cache_dtype_bytes: int | None = None,
    cache_scope: str = "layer",
    drop_page_cache: bool = False,
    async_prefetch: bool | None = None,
    prefetch_width: int | None = None,
    **unknown: Any,
) -> ExpertBackend:
    """The expert backend for a model (see the module docstring for the options)."""
    from offload.engine import ExpertEngine
    from offload.experts import expert_raws, spec_of
    from offload.planner import make_plan
    from offload.resident import ResidentExperts
    from offload.stores import DiskStore, RamStore

    if unknown:
        raise LiteError(
            f"unknown option(s) {', '.join(sorted(unknown))} for lite.load; see offload.build_experts for the options"
        )
    check_miss_policy(miss_policy)
    if cache_scope not in ("layer", "global"):
        raise LiteError(f"cache_scope must be layer or global (got {cache_scope!r})")
    lookahead = _lookahead(prefetch)
    device = torch.device(device)
    if not stacks:  # a model without MoE layers
        return ResidentExperts(stacks, device, dtype)
    cuda = device.type == "cuda"
    dtype_bytes = torch.finfo(dtype).bits // 8
    if model_sizes is None and gguf_file is not None:
        from offload.planner import model_sizes as sizes_of

        model_sizes = sizes_of(gguf_file.metadata, gguf_file.tensors, dtype_bytes, device.type)
    sizes = model_sizes or sizes_from_stacks(stacks)
    plan = make_plan(
        sizes,
        device=str(device),
        gpu_memory=gpu_memory,
        ram_memory=ram_memory,
        ctx=ctx or DEFAULT_CTX,
        cache_dtype_bytes=cache_dtype_bytes or (2 if cuda else 4),
        experts_on=experts_on,
        expert_cache=expert_cache,
    )
    layers = sorted(stacks)
    n_experts = sizes.n_experts
    specs = {layer: spec_of(st) for layer, st in stacks.items()}  # each layer's own GGUF types and sizes
    common = dict(layers=layers, n_experts=n_experts, predict=predict, device=device, specs=specs, scope=cache_scope)
    if plan.experts_on == "device":
        preloaded = {(layer, e): expert_raws(stacks[layer], e) for layer in layers for e in range(n_experts)}
        engine = ExpertEngine(None, slots_per_layer=n_experts, lookahead=0, miss_policy="fetch", preloaded=preloaded,
                              **common)  # fmt: skip
        engine.plan, engine.stacks = plan, stacks
        return engine

    # Every tier keeps the GGUF bytes: RAM is the file's mmap, the disk tier reads them into its own buffers, and
    # misses computed on the CPU run the native kernels on those same bytes (no second copy).
    if plan.experts_on == "ram":
        store: Any = RamStore(stacks)
    else:
        store = DiskStore(stacks, plan.ram_expert_bytes, drop_page_cache=drop_page_cache)
    if prefetch_width is None and sizes.experts_per_token > 1:
        # Fill at most 2 x top-k slots per prediction: on the demo, width 2k at 2k slots gave the best effective hit
        # rate (benchmarks/README.md "Offload"); with many more slots, filling them all re-copies a layer's worth of
        # experts per token (on a random V2-Lite-shaped model, 12 slots: ~72 MB per layer per token over PCIe).
        prefetch_width = 2 * sizes.experts_per_token
    engine = ExpertEngine(store, slots_per_layer=plan.slots_per_layer, lookahead=lookahead, miss_policy=miss_policy,
                          async_prefetch=async_prefetch, prefetch_width=prefetch_width, **common)  # fmt: skip
    if isinstance(store, DiskStore):
        store.on_read = lambda layer, n: engine.stats_.add(layer, "bytes_disk", n)
    engine.plan, engine.stacks = plan, stacks
    return engine
