"""What a GGUF file holds: metadata, tensor types, sizes and bits per weight (the library half of `lite info`)."""

from __future__ import annotations

import os
from typing import Any

from quant.gguf_file import GGUFFile

ARRAY_HEAD = 6  # items shown of a long array (a 100k-token vocabulary is summarised, not printed)


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

    Returns a dict with `path`, `file_bytes`, `architecture`, `metadata` (long arrays and strings abbreviated
    unless `full`), `n_tensors`, `n_params`, `data_bytes`, `bits_per_weight`, `expert_bits_per_weight` (routed
    expert stacks only; None without them), `types` ({type name: {"count", "params", "bytes"}}) and `tensors`
    (a list of {"name", "type", "shape", "bytes"} in file order). Raises LiteError for a missing or bad file.
    """
    g = GGUFFile(path)
    types: dict[str, dict[str, int]] = {}
    tensors = []
    n_params = data_bytes = exp_params = exp_bytes = 0
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
        tensors.append({"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes})
    meta = g.metadata if full else {k: abbreviate(v) for k, v in g.metadata.items()}
    return {
        "path": g.path,
        "file_bytes": os.path.getsize(g.path),
        "architecture": g.architecture,
        "metadata": meta,
        "n_tensors": len(tensors),
        "n_params": n_params,
        "data_bytes": data_bytes,
        "bits_per_weight": 8.0 * data_bytes / max(1, n_params),
        "expert_bits_per_weight": 8.0 * exp_bytes / exp_params if exp_params else None,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
    }
