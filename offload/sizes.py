"""What a model needs, in bytes, from GGUF metadata and tensor sizes only (no weights are read): `ModelSizes`.

Every count is the bytes actually allocated (offload/planner.py's docstring says where each part lives): 2-D weights
as their GGUF bytes, 1-D tensors at the compute dtype, the routers in float32, the absorbed-attention factors
dequantized; routed experts per layer in the slot layout of `quant.device_kernels.ExpertSpec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quant.errors import LiteError

GiB = 1024**3
MiB = 1024**2
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
EMBEDDING = "token_embd.weight"
# Loaded dense whatever their GGUF type (lite/weights.py): attention's absorbed factors, at the compute dtype...
DENSE_LOADED = re.compile(r"\.attn_(k_b|v_b|kv_b)\.weight$")
# ...and the routers, always float32.
FLOAT32_LOADED = re.compile(r"\.ffn_gate_inp\.weight$")
DEFAULT_CTX = 4096  # the context planned and opened when none is given (the model may allow far more)
ALIGN = 16  # the offsets of gate, up and down inside a slot, and a slot row's width (quant.device_kernels)


_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(I?)B|B)?$")


def parse_size(value: int | float | str | None, what: str = "size") -> int | None:
    """Bytes from an int or a string: plain bytes ("1048576") or a number with K/M/G/T and iB (powers of 1024) or B
    (powers of 1000), e.g. "6GiB", "1.5 GiB", "500MB"; None stays None. Raises LiteError naming `what`."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise LiteError(f"{what} must not be negative (got {value}); give bytes or a size such as 6GiB")
        return int(value)
    text = str(value)
    m = _SIZE.match(text.strip().upper())
    if m is None:
        raise LiteError(f"{what} takes bytes or a size such as 6GiB, 512MiB or 8GB, got {text!r}")
    number, unit, binary = m.groups()
    if unit is None and "." in number:
        raise LiteError(f"{what} {text} is a fraction of a byte; give whole bytes or a unit such as 1.5GiB")
    n = float(number) if "." in number else int(number)
    return int(n * (1024 if binary else 1000) ** _UNITS[unit or ""])


def format_bytes(n: int | float, digits: int = 2) -> str:
    """1.23 GiB / 45.6 MiB / 789 KiB / 12 B (`digits` after the point)."""
    n = float(n)
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def gguf_nbytes(qtype: Any, shape: tuple[int, ...]) -> int:
    """The GGUF bytes of a tensor of `shape` (torch order: the last dim is the row) and `qtype`."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return _numel(shape) // block * size


def memory_bytes(qtype: Any, shape: tuple[int, ...], dtype_bytes: int = 2, device: str = "cuda") -> int:
    """Bytes a weight takes once loaded for `device`: on CUDA a 2-D (or stacked) weight is its GGUF bytes; on the
    CPU what `quant.qmatrix.loaded_nbytes` says; 1-D tensors (norms) are dense values of `dtype_bytes`."""
    if len(shape) < 2:
        return _numel(shape) * dtype_bytes
    if device.startswith("cuda"):
        return gguf_nbytes(qtype, shape)
    from quant.qmatrix import loaded_nbytes

    return loaded_nbytes(qtype, shape, "cpu", dtype_bytes)


def tensor_bytes(name: str, t: Any, dtype_bytes: int, device: str) -> int:
    """Bytes a non-expert tensor of the file takes on `device` once loaded (see the module docstring)."""
    shape = tuple(int(d) for d in t.shape)
    if FLOAT32_LOADED.search(name):
        return _numel(shape) * 4
    if len(shape) < 2 or DENSE_LOADED.search(name):
        return _numel(shape) * dtype_bytes
    if device.startswith("cuda"):
        return int(t.nbytes)
    return memory_bytes(t.qtype, shape, dtype_bytes, "cpu")


def slot_bytes(gate: int, up: int, down: int) -> int:
    """One expert in a slot row (and a disk-tier buffer): gate, up and down at 16-byte-aligned offsets, the row
    16-byte aligned (`quant.device_kernels.ExpertSpec.packed` and offload/engine.py's pools)."""
    return _align(_align(_align(gate) + up) + down)


@dataclass
class ModelSizes:
    """What the planner needs to know about a model, from metadata and tensor types and shapes."""

    n_layers: int
    moe_layers: list[int]
    n_experts: int
    experts_per_token: int
    latent_per_token_layer: int  # kv_lora_rank + qk_rope_head_dim values
    dense_bytes: int  # every tensor but the routed experts and the token embedding, as loaded on the device
    expert_bytes: int  # one expert in a device slot, the largest layer's (a slot's size when one pool serves all)
    expert_file_bytes: int  # one expert in the GGUF, the largest layer's (what the disk tier reads)
    context_length: int
    expert_bytes_by_layer: dict[int, int] = field(default_factory=dict)  # one expert in a slot, per MoE layer
    expert_file_bytes_by_layer: dict[int, int] = field(default_factory=dict)  # one expert in the file, per layer
    embedding_bytes: int = 0  # the token embedding: the file's mmap, in RAM on every device

    def layer_bytes(self, layer: int) -> int:
        """One expert of `layer` in a device slot (or a disk-tier buffer)."""
        return self.expert_bytes_by_layer.get(layer, self.expert_bytes)

    def layer_file_bytes(self, layer: int) -> int:
        """One expert of `layer` in the GGUF (and in RAM: the mmap pages)."""
        if layer in self.expert_file_bytes_by_layer:
            return self.expert_file_bytes_by_layer[layer]
        if not self.expert_file_bytes_by_layer and layer in self.expert_bytes_by_layer:
            return self.expert_bytes_by_layer[layer]  # sizes built from slot layouts only
        return self.expert_file_bytes

    @property
    def slot_set_bytes(self) -> int:
        """One slot in every MoE layer: the sum over layers of that layer's expert bytes."""
        return sum(self.layer_bytes(i) for i in self.moe_layers)

    @property
    def file_set_bytes(self) -> int:
        """One expert of every MoE layer in the file."""
        return sum(self.layer_file_bytes(i) for i in self.moe_layers)

    @property
    def expert_total(self) -> int:
        """Every routed expert in slots (all resident on the device)."""
        return self.slot_set_bytes * self.n_experts

    @property
    def expert_file_total(self) -> int:
        """Every routed expert in the file (and in RAM as the mmap)."""
        return self.file_set_bytes * self.n_experts

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
    parts: dict[int, dict[str, int]] = {}  # layer -> {gate, up, down: GGUF bytes of one expert}
    dense = embedding = 0
    for name, t in tensors.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            parts.setdefault(int(m.group(1)), {})[m.group(2)] = int(t.nbytes) // max(int(t.shape[0]), 1)
        elif name == EMBEDDING:
            embedding = int(t.nbytes)
            if "output.weight" not in tensors:  # tied: the output matrix is the embedding, loaded on the device
                dense += tensor_bytes("output.weight", t, dtype_bytes, device)
        else:
            dense += tensor_bytes(name, t, dtype_bytes, device)
    file_by_layer = {i: sum(p.values()) for i, p in parts.items()}
    slot_by_layer = {i: slot_bytes(p.get("gate", 0), p.get("up", 0), p.get("down", 0)) for i, p in parts.items()}
    return ModelSizes(
        n_layers=int(key("block_count")),
        moe_layers=sorted(parts),
        n_experts=n_experts,
        experts_per_token=int(key("expert_used_count", 0)),
        latent_per_token_layer=int(key("attention.kv_lora_rank")) + int(key("rope.dimension_count")),
        dense_bytes=dense,
        expert_bytes=max(slot_by_layer.values(), default=0),
        expert_file_bytes=max(file_by_layer.values(), default=0),
        context_length=int(key("context_length", 4096)),
        expert_bytes_by_layer=slot_by_layer,
        expert_file_bytes_by_layer=file_by_layer,
        embedding_bytes=embedding,
    )
