"""A GGUF header parser that validates before it trusts (versions 2 and 3, little-endian).

Every count and length is checked against the file size before it is used, so a truncated or corrupt file
raises one `LiteError` line saying where it breaks ("truncated at byte N (expected M)", "corrupt at byte N:
…") instead of a numpy error. Tensor infos are checked too: a known type, 1 to 4 dimensions, no overflow, whole
blocks per row, an aligned offset, and data that lies inside the file without overlapping another tensor.
Values are returned as plain Python: str, int, float, bool, or (nested) lists of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from quant.errors import LiteError

_T = gguf.GGUFValueType
# value type -> (struct format, numpy dtype) for the fixed-size scalars, little-endian
_SCALARS: dict[int, tuple[str, str]] = {
    _T.UINT8: ("<B", "<u1"), _T.INT8: ("<b", "<i1"), _T.UINT16: ("<H", "<u2"), _T.INT16: ("<h", "<i2"),
    _T.UINT32: ("<I", "<u4"), _T.INT32: ("<i", "<i4"), _T.FLOAT32: ("<f", "<f4"), _T.BOOL: ("<?", "|b1"),
    _T.UINT64: ("<Q", "<u8"), _T.INT64: ("<q", "<i8"), _T.FLOAT64: ("<d", "<f8"),
}  # fmt: skip
_MIN_BYTES = {**{t: struct.calcsize(f) for t, (f, _) in _SCALARS.items()}, _T.STRING: 8, _T.ARRAY: 12}
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays; real files have none
INT64_MAX = 2**63 - 1
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: the row length first
    offset: int  # absolute file offset of the first byte
    nbytes: int
    n_elements: int


@dataclass
class Header:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, list[gguf.GGUFValueType]]  # key -> [type, item type of an array, ...]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    notes: list[str] = field(default_factory=list)


class _Cursor:
    """Reads the buffer front to back; every read is checked against the file size first."""

    def __init__(self, buf: Any, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.view = memoryview(buf).cast("B")

    def truncated(self, end: int, what: str, exact: bool = False) -> LiteError:
        expected = f"expected {end} bytes" if exact else f"expected at least {end}"
        return LiteError(
            f"{self.path} is truncated at byte {self.size} ({expected}): {what} at byte {self.pos} runs past the "
            "end of the file; download or convert it again"
        )

    def corrupt(self, what: str, at: int | None = None) -> LiteError:
        at = self.pos if at is None else at
        return LiteError(f"{self.path} is corrupt at byte {at}: {what}; download or convert it again")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.truncated(self.pos + n, what)

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALARS[vtype][0]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(_T.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(_T.UINT64, what))

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} is not UTF-8 text", start) from None
        self.pos += n
        return text

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row (a vocabulary): one tight loop, each length checked before it is used."""
        view, size, p, values = self.view, self.size, self.pos, []
        length = _U64.unpack_from
        try:
            for _ in range(n):
                if p + 8 > size:
                    break
                (m,) = length(view, p)
                if p + 8 + m > size:
                    break
                values.append(str(view[p + 8 : p + 8 + m], "utf-8"))
                p += 8 + m
        except UnicodeDecodeError:
            raise self.corrupt(f"item {len(values)} of {what} is not UTF-8 text", p) from None
        self.pos = p
        if len(values) < n:  # the loop stopped at the end of the file
            self.string(f"item {len(values)} of {what}")  # raises the truncation error for that item
        return values

    def count(self, what: str, min_item: int) -> int:
        """A count of items of at least `min_item` bytes each, checked against the bytes left."""
        at = self.pos
        n = self.u64(what)
        left = self.size - self.pos
        if n * min_item > left:
            self.pos = at
            raise self.truncated(self.pos + 8 + n * min_item, f"{what} ({n:,} items)")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, list[gguf.GGUFValueType]]:
        if vtype in _SCALARS:
            return self.scalar(vtype, what), [_T(vtype)]
        if vtype == _T.STRING:
            return self.string(what), [_T.STRING]
        if vtype != _T.ARRAY:
            raise self.corrupt(f"{what} has unknown value type {vtype}", self.pos - 4)
        if depth >= MAX_NESTING:
            raise self.corrupt(f"{what} nests arrays more than {MAX_NESTING} deep")
        itype = self.u32(f"the item type of {what}")
        if itype not in _MIN_BYTES:
            raise self.corrupt(f"{what} is an array of unknown value type {itype}", self.pos - 4)
        n = self.count(f"the array {what}", _MIN_BYTES[itype])
        if itype in _SCALARS:  # one view for all items
            dtype = np.dtype(_SCALARS[itype][1])
            items = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return items, [_T.ARRAY, _T(itype)]
        if itype == _T.STRING:
            return self.strings(n, what), [_T.ARRAY, _T.STRING]
        values, sub = [], [_T(itype)]
        for i in range(n):
            v, sub = self.value(itype, f"item {i} of {what}", depth + 1)
            values.append(v)
        return values, [_T.ARRAY, *sub]


def parse_header(buf: Any, size: int, path: str) -> Header:
    """Parse and validate the GGUF header in `buf` (any buffer of `size` bytes: a memory map)."""
    c = _Cursor(buf, size, path)
    if size < 4 or bytes(buf[:4]) != b"GGUF":
        raise LiteError(f"{path} is not a readable GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    c.pos = 4
    version = c.u32("the format version")
    if version & 0xFFFF == 0 and version:
        raise LiteError(f"{path} is a big-endian GGUF file; lite reads little-endian ones (as llama.cpp writes)")
    if version not in (2, 3):
        raise LiteError(f"{path} is GGUF version {version}; lite reads versions 2 and 3, convert it again")
    n_tensors = c.count("the tensor count", 8 + 4 + 8 + 4 + 8)  # name length, dims, one dim, type, offset
    n_kv = c.count("the metadata count", 8 + 4 + 1)  # key length, type, the smallest value
    metadata: dict[str, Any] = {}
    value_types: dict[str, list[gguf.GGUFValueType]] = {}
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"the name of metadata key {i}")
        if key in metadata:
            raise c.corrupt(f"metadata key {key!r} appears twice", at)
        vtype = c.u32(f"the type of {key!r}")
        metadata[key], value_types[key] = c.value(vtype, repr(key))
    infos = [_tensor_info(c, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (
        value_types["general.alignment"] != [_T.UINT32] or alignment <= 0 or alignment & (alignment - 1)
    ):
        raise c.corrupt(f"general.alignment is {alignment!r}; it must be a power of two (a uint32)", 0)
    data_offset = -(-c.pos // alignment) * alignment
    tensors = _place(c, infos, data_offset, alignment)
    return Header(version, metadata, value_types, tensors, alignment, data_offset, size)


def _tensor_info(c: _Cursor, i: int) -> tuple[int, str, int, tuple[int, ...], int]:
    """(position, name, raw type, dims, relative offset) of tensor info `i`, each field range-checked."""
    at = c.pos
    name = c.string(f"the name of tensor {i}")
    what = f"tensor {name!r}"
    n_dims = c.u32(f"the number of dimensions of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.corrupt(f"{what} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}", c.pos - 4)
    c.need(8 * n_dims, f"the shape of {what}")
    dims = tuple(c.u64(f"the shape of {what}") for _ in range(n_dims))
    raw_type = c.u32(f"the type of {what}")
    offset = c.u64(f"the data offset of {what}")
    return at, name, raw_type, dims, offset


def _place(c: _Cursor, infos: list, data_offset: int, alignment: int) -> list[TensorInfo]:
    """TensorInfos with sizes and absolute offsets; types, shapes and extents checked."""
    tensors, names = [], set()
    for at, name, raw_type, dims, offset in infos:
        what = f"tensor {name!r}"
        if name in names:
            raise c.corrupt(f"{what} appears twice", at)
        names.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.corrupt(f"{what} has unknown type {raw_type}", at) from None
        n = 1
        for d in dims:
            n *= d
        if min(dims) < 1 or n > INT64_MAX:
            raise c.corrupt(f"{what} has shape {list(dims)}; each dimension must be at least 1", at)
        if dims[0] % block:
            raise c.corrupt(f"{what} has rows of {dims[0]} values, not whole {qtype.name} blocks of {block}", at)
        if offset % alignment:
            raise c.corrupt(f"{what} starts at data offset {offset}, not a multiple of the alignment {alignment}", at)
        tensors.append(TensorInfo(name, qtype, dims, data_offset + offset, n // block * type_size, n))
    end, last = data_offset, None
    for t in sorted(tensors, key=lambda t: t.offset):
        if last is not None and t.offset < end:
            raise c.corrupt(f"tensor {t.name!r} overlaps tensor {last.name!r} in the data region", t.offset)
        end, last = max(end, t.offset + t.nbytes), t
    if last is not None and end > c.size:
        c.pos = last.offset
        raise c.truncated(end, f"the data of tensor {last.name!r}", exact=True)
    return tensors
