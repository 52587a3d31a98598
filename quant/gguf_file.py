"""Read a GGUF file: metadata as plain Python values, tensors as memory-mapped raw bytes.

Built on `gguf.GGUFReader`, which memory-maps the file, so opening never copies tensor data. The stock reader
builds two numpy views per string of an array field, which takes seconds for a 100k-token vocabulary; `_FastReader`
parses array fields in one pass instead (scalar arrays as one numpy view, string arrays decoded straight from the
mmap), so a tokenizer's metadata loads in a fraction of a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from quant.errors import LiteError

_T = gguf.GGUFValueType


class _FastReader(gguf.GGUFReader):
    """`GGUFReader` with a one-pass parser for array fields (native byte order only).

    Scalar arrays become one part holding all items; string arrays keep their raw bytes as one part and their
    decoded values in `self.string_arrays[field_offset]` (the stock `ReaderField.contents` does not apply to them).
    """

    def __init__(self, path: os.PathLike[str] | str):
        self.string_arrays: dict[int, list[str]] = {}
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != _T.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, count, offs = _T(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        if itype == _T.STRING:
            buf = memoryview(self.data)
            values, p = [], offs
            for _ in range(count):
                n = int.from_bytes(buf[p : p + 8], "little")
                values.append(str(buf[p + 8 : p + 8 + n], "utf-8"))
                p += 8 + n
            self.string_arrays[orig_offs] = values
            return p - orig_offs, [raw_itype, alen, self.data[offs:p]], [2], [_T.ARRAY, _T.STRING]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # nested arrays: rare, leave them to the stock parser
            return super()._get_field_parts(orig_offs, raw_type)
        items = self._get(offs, nptype, count)
        return 12 + int(items.nbytes), [raw_itype, alen, items], [2], [_T.ARRAY, itype]


def _field_value(reader: _FastReader, field: gguf.ReaderField) -> Any:
    """A metadata field as a plain Python value: str, int, float, bool, or a list of them."""
    main = field.types[0]
    if main == _T.ARRAY:
        values_offset = field.offset + sum(int(part.nbytes) for part in field.parts[:3])  # after key and type
        if values_offset in reader.string_arrays:
            return reader.string_arrays[values_offset]
        return field.contents()
    if main == _T.STRING:
        return str(field.parts[-1].tobytes(), "utf-8")
    return field.parts[-1].tolist()[0]


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
        if not os.path.isfile(self.path):
            raise LiteError(f"GGUF file not found: {self.path}; check the path")
        try:
            self.reader = _FastReader(self.path)
        except (ValueError, KeyError, IndexError) as e:
            raise LiteError(f"not a readable GGUF file: {self.path} ({e}); pass a .gguf model file") from None
        r = self.reader
        self.metadata: dict[str, Any] = {
            name: _field_value(r, field) for name, field in r.fields.items() if not name.startswith("GGUF.")
        }
        self.tensors: dict[str, TensorRef] = {}
        for t in r.tensors:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            raw = r.data[t.data_offset : t.data_offset + int(t.n_bytes)]
            if raw.nbytes != int(t.n_bytes):
                raise LiteError(f"GGUF file is truncated: tensor {t.name} ends past the end of {self.path}")
            self.tensors[t.name] = TensorRef(t.name, qtype, shape, raw, int(t.data_offset))

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
