"""Read a GGUF file: metadata as plain Python values, tensors as memory-mapped raw bytes.

The file is memory-mapped, so opening never copies tensor data, and its header is parsed by
`quant.gguf_header.parse_header`, which checks every count, length and tensor extent against the file size
before trusting it: a truncated or corrupt file raises one `LiteError` line saying where it breaks. String
arrays (a 100k-token vocabulary) are decoded straight from the map in one pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from quant.errors import LiteError
from quant.gguf_header import Header, parse_header


@dataclass(frozen=True, eq=False)
class TensorRef:
    """One tensor of a GGUF file: its type, its shape in torch order, and its raw bytes (a view of the mmap)."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: rows first, e.g. (n_expert, out, in)
    data: np.ndarray  # uint8 [nbytes], a view of the memory-mapped file
    offset: int  # absolute file offset of the first byte, for pread

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def slice_bytes(self, i: int) -> np.ndarray:
        """Raw bytes of entry `i` along the first axis (one expert of a stack), a view of the mmap."""
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for first axis of size {n}")
        i %= n
        per = self.nbytes // n
        return self.data[i * per : (i + 1) * per]

    def slice_offset(self, i: int) -> int:
        """Absolute file offset of entry `i` along the first axis."""
        return self.offset + (i % self.shape[0]) * (self.nbytes // self.shape[0])

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, {self.qtype.name}, shape={self.shape}, nbytes={self.nbytes})"


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped: `.metadata` (plain values) and `.tensors` (in file order)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise LiteError(f"{self.path} is a directory, not a GGUF file; pass the .gguf file itself")
        if not os.path.exists(self.path):
            raise LiteError(f"GGUF file not found: {self.path}; check the path")
        try:
            size = os.path.getsize(self.path)
            if size == 0:
                raise LiteError(f"{self.path} is empty (0 bytes), not a GGUF file; download or convert it again")
            self.data = np.memmap(self.path, mode="r")  # uint8 [size]
        except OSError as e:
            raise LiteError(f"cannot read {self.path}: {e.strerror or e}; check the path and its permissions") from None
        self.header: Header = parse_header(self.data, size, self.path)
        self.metadata: dict[str, Any] = self.header.metadata
        self.tensors: dict[str, TensorRef] = {}
        for t in self.header.tensors:
            raw = self.data[t.offset : t.offset + t.nbytes]
            self.tensors[t.name] = TensorRef(t.name, t.qtype, tuple(reversed(t.dims)), raw, t.offset)

    @property
    def reader(self) -> gguf.GGUFReader:
        """gguf-py's own reader of this (already validated) file, for tools that need its field objects."""
        return gguf.GGUFReader(self.path, "r")

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
