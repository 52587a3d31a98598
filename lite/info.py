"""What a GGUF file holds: metadata, tensor types, sizes and bits per weight (the library half of `lite info`)."""

from __future__ import annotations

import os
from typing import Any

from lite.config import ARCH, GATING_FUNCS
from quant.gguf_file import GGUFFile

ARRAY_HEAD = 6  # items shown of a long array (a 100k-token vocabulary is summarised, not printed)

# (family, gate, routed experts, layers, hidden size) of the published deepseek2-architecture models
FAMILIES = (
    ("DeepSeek-V2", "softmax", 160, 60, 5120),  # also V2.5 and Coder-V2
    ("DeepSeek-V2-Lite", "softmax", 64, 27, 2048),  # also Coder-V2-Lite
    ("DeepSeek-V3/R1", "sigmoid", 256, 61, 7168),
    ("Moonlight", "sigmoid", 64, 27, 2048),
    ("Kimi-K2", "sigmoid", 384, 61, 7168),
)


def family(meta: dict[str, Any]) -> str:
    """Which model family a GGUF's metadata describes: V2, V2-Lite, V3/R1, Moonlight, Kimi-K2, or a variant."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        return f"{arch} (not deepseek2)"
    gating = meta.get(f"{ARCH}.expert_gating_func", 1)  # absent: softmax, as llama.cpp reads old V2 files
    gate = GATING_FUNCS.get(gating)
    shape = (gate, *(meta.get(f"{ARCH}.{k}") for k in ("expert_count", "block_count", "embedding_length")))
    for name, *signature in FAMILIES:
        if tuple(signature) == shape:
            return name
    if gate is None:
        return f"deepseek2 variant (unknown router: {ARCH}.expert_gating_func = {gating!r})"
    return f"deepseek2 variant ({gate} router)"


def router(meta: dict[str, Any]) -> str:
    """The routing rule in words, e.g. "sigmoid + correction bias, top-8 of 256 in 4 of 8 groups (top-2 sum),
    normalised, x2.5"."""

    def k(name: str, default: Any = None) -> Any:
        return meta.get(f"{ARCH}.{name}", default)

    gate = GATING_FUNCS.get(k("expert_gating_func", 1), "unknown gate")
    text = gate + (" + correction bias" if gate == "sigmoid" else "")
    text += f", top-{k('expert_used_count', 0)} of {k('expert_count', 0)}"
    groups, used = k("expert_group_count", 1), k("expert_group_used_count", 1)
    if groups > 1 and used < groups:
        text += f" in {used} of {groups} groups ({'top-2 sum' if gate == 'sigmoid' else 'best expert'})"
    if k("expert_weights_norm", False):
        text += ", normalised"
    scale = k("expert_weights_scale", 1.0)
    return text + (f", x{scale:.4g}" if scale != 1.0 else "")


def abbreviate(value: Any, head: int = ARRAY_HEAD) -> Any:
    """A long list as a short string: `[102400 items] 'a', 'b', … ` ; other values unchanged."""
    if isinstance(value, list) and len(value) > head:
        shown = ", ".join(repr(v) for v in value[:head])
        return f"[{len(value)} items] {shown}, …"
    if isinstance(value, str) and len(value) > 200:  # e.g. a chat template
        return value[:200].replace("\n", "\\n") + f"… ({len(value)} chars)"
    return value


def describe(path: str | os.PathLike[str], *, full: bool = False) -> dict[str, Any]:
    """A summary of a GGUF file.

    Returns a dict with `path`, `file_bytes`, `architecture`, `family` and `router` (deepseek2 files: see
    `family`, `router`), `metadata` (long arrays and strings abbreviated
    unless `full`), `n_tensors`, `n_params`, `data_bytes`, `bits_per_weight`, `expert_bits_per_weight` (routed
    expert stacks only; None without them), `expert_types` ({type name: params} of the routed experts, most
    first), `types` ({type name: {"count", "params", "bytes"}}) and `tensors`
    (a list of {"name", "type", "shape", "bytes"} in file order). Raises LiteError for a missing or bad file.
    """
    g = GGUFFile(path)
    types: dict[str, dict[str, int]] = {}
    tensors = []
    n_params = data_bytes = exp_params = exp_bytes = 0
    expert_types: dict[str, int] = {}
    for t in g.tensors.values():
        entry = types.setdefault(t.qtype.name, {"count": 0, "params": 0, "bytes": 0})
        entry["count"] += 1
        entry["params"] += t.n_elements
        entry["bytes"] += t.nbytes
        n_params += t.n_elements
        data_bytes += t.nbytes
        if t.name.endswith("_exps.weight"):
            exp_params += t.n_elements
            exp_bytes += t.nbytes
            expert_types[t.qtype.name] = expert_types.get(t.qtype.name, 0) + t.n_elements
        tensors.append({"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes})
    meta = g.metadata if full else {k: abbreviate(v) for k, v in g.metadata.items()}
    return {
        "path": g.path,
        "file_bytes": os.path.getsize(g.path),
        "architecture": g.architecture,
        "family": family(g.metadata),
        "router": router(g.metadata) if g.architecture == ARCH else None,
        "metadata": meta,
        "n_tensors": len(tensors),
        "n_params": n_params,
        "data_bytes": data_bytes,
        "bits_per_weight": 8.0 * data_bytes / max(1, n_params),
        "expert_bits_per_weight": 8.0 * exp_bytes / exp_params if exp_params else None,
        "expert_types": dict(sorted(expert_types.items(), key=lambda kv: -kv[1])),
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
    }
