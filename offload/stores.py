"""Host tiers (mechanism only): where an expert's GGUF bytes come from before they are copied to the device tier.

- `RamStore`: the memory-mapped GGUF itself. Every expert is the file's own pages: no second copy, no repack.
- `DiskStore`: the GGUF read with `os.pread` (or through the mmap when the file path is unknown), one buffer per
  expert laid out by its layer's `ExpertSpec`, behind a RAM LRU bounded in bytes. Its reads only ever run on the
  engine's single background worker thread, so the LRU needs no lock.

Both hand out `read_raw(key)` (the three byte ranges, for copies into slots) and `read_cpu(key)` (an expert the CPU
kernels run on those same bytes, for misses computed on the CPU).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from offload.experts import ExpertWeights, Raws, expert_raws, host_expert, row_raws, spec_of
from quant.device_kernels import ExpertSpec

Key = tuple[int, int]


class RamStore:
    """All experts in RAM: the file's mmap pages."""

    on_disk = False

    def __init__(self, stacks: dict[int, Any]):
        self.stacks = stacks
        self.specs: dict[int, ExpertSpec] = {layer: spec_of(st) for layer, st in stacks.items()}
        self._cpu: dict[Key, ExpertWeights] = {}  # views of the mmap, built on first use

    def read_raw(self, key: Key) -> Raws:
        return expert_raws(self.stacks[key[0]], key[1])

    def read_cpu(self, key: Key) -> ExpertWeights:
        ex = self._cpu.get(key)
        if ex is None:
            ex = self._cpu[key] = host_expert(self.read_raw(key), self.specs[key[0]])
        return ex

    def has(self, key: Key) -> bool:
        return True


class DiskStore:
    """Experts read from the GGUF on demand into a RAM LRU of at most `budget` bytes."""

    on_disk = True

    def __init__(
        self,
        stacks: dict[int, Any],
        budget: int,
        on_read: Callable[[int, int], None] | None = None,
        drop_page_cache: bool = False,
    ):
        self.stacks = stacks
        self.specs: dict[int, ExpertSpec] = {layer: spec_of(st) for layer, st in stacks.items()}
        self.on_read = on_read  # (layer, bytes read from disk)
        self.drop_page_cache = drop_page_cache
        # at least two experts of the largest layer, so a read never evicts the expert being used
        self.budget = max(int(budget), 2 * max(s.nbytes for s in self.specs.values()))
        self.held = 0  # bytes of the buffers in the LRU
        self.lru: OrderedDict[Key, tuple[np.ndarray, ExpertWeights | None]] = OrderedDict()
        self._fds: dict[str, int] = {}

    def has(self, key: Key) -> bool:
        return key in self.lru

    def read_raw(self, key: Key) -> Raws:
        return row_raws(self._entry(key), self.specs[key[0]])

    def read_cpu(self, key: Key) -> ExpertWeights:
        buf = self._entry(key)
        ex = self.lru[key][1]
        if ex is None:
            ex = host_expert(row_raws(buf, self.specs[key[0]]), self.specs[key[0]])
            self.lru[key] = (buf, ex)
        return ex

    def _entry(self, key: Key) -> np.ndarray:
        entry = self.lru.get(key)
        if entry is not None:
            self.lru.move_to_end(key)
            return entry[0]
        layer, e = key
        st, spec = self.stacks[layer], self.specs[layer]
        buf = np.empty(spec.nbytes, dtype=np.uint8)
        for ref, dst in zip((st.gate, st.up, st.down), row_raws(buf, spec)):
            self._read_slice(ref, e, dst)
        if self.on_read is not None:
            self.on_read(layer, sum(r.nbytes for r in row_raws(buf, spec)))
        while self.lru and self.held + buf.nbytes > self.budget:
            _, (old, _) = self.lru.popitem(last=False)  # users still holding it keep it alive
            self.held -= old.nbytes
        self.lru[key] = (buf, None)
        self.held += buf.nbytes
        return buf

    def _read_slice(self, ref: Any, e: int, dst: np.ndarray) -> None:
        path = getattr(ref.data, "filename", None)  # numpy memmap views remember their file
        if not path:
            dst[:] = ref.slice_bytes(e)  # copy out of the mmap: page faults do the reading
            return
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        offset = ref.slice_offset(e)
        got = os.preadv(fd, [dst.data], offset)  # straight into the expert's buffer
        if got != dst.nbytes:
            raise OSError(f"short read of {ref.name} expert {e}: {got} of {dst.nbytes} bytes")
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            # make the next read of these bytes come from the disk again (honest disk-tier benchmarks)
            os.posix_fadvise(fd, offset, dst.nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
