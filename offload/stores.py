"""Host tiers (mechanism only): where an expert's bytes come from before they are copied to the device tier.

- `RamStore`: every expert built once into RAM (pinned on CUDA so host->device copies are asynchronous).
- `DiskStore`: the GGUF itself, read with `os.pread` (or through the mmap when the file path is unknown),
  behind a RAM LRU bounded in bytes. Its `read` is only ever called from the engine's single background
  worker thread, so the LRU needs no lock.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from offload.experts import ExpertWeights, raw_nbytes

Key = tuple[int, int]
Build = Callable[[tuple, object], ExpertWeights]  # (raw gate/up/down bytes, stacks) -> host-form expert


class RamStore:
    """All experts in RAM."""

    on_disk = False

    def __init__(self, stacks: dict[int, object], build: Build, pin: bool = False, build_cpu: Build | None = None):
        self.experts: dict[Key, ExpertWeights] = {}
        self.cpu_experts: dict[Key, ExpertWeights] = {}  # CPU-kernel copies, when `build` packs for the GPU
        for layer, st in stacks.items():
            for e in range(st.gate.shape[0]):
                raws = tuple(ref.slice_bytes(e) for ref in (st.gate, st.up, st.down))
                ex = build(raws, st)
                self.experts[(layer, e)] = ex.pin_memory() if pin else ex
                if build_cpu is not None:
                    self.cpu_experts[(layer, e)] = build_cpu(raws, st)

    def read(self, key: Key) -> ExpertWeights:
        return self.experts[key]

    def read_cpu(self, key: Key) -> ExpertWeights:
        """The copy the CPU kernels can run (the same object unless the device's layout differs)."""
        return self.cpu_experts.get(key) or self.experts[key]

    def has(self, key: Key) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())


class DiskStore:
    """Experts read from the GGUF on demand into a RAM LRU of at most `budget` bytes of loaded experts
    (`expert_bytes` each)."""

    on_disk = True

    def __init__(
        self,
        stacks: dict[int, object],
        build: Build,
        budget: int,
        expert_bytes: int,
        pin: bool = False,
        on_read: Callable[[int, int], None] | None = None,
        drop_page_cache: bool = False,
        build_cpu: Build | None = None,
    ):
        self.stacks = stacks
        self.build = build
        self.build_cpu = build_cpu  # also keep a CPU-kernel copy of each expert (CUDA with CPU-computed misses)
        self.pin = pin
        self.on_read = on_read  # (layer, bytes read from disk)
        self.drop_page_cache = drop_page_cache
        self.raw_bytes = raw_nbytes(next(iter(stacks.values())))  # read from disk per expert
        per = expert_bytes * (2 if build_cpu else 1)
        self.capacity = max(int(budget // max(per, 1)), 1)  # experts held in RAM (as loaded)
        self.lru: OrderedDict[Key, tuple[ExpertWeights, ExpertWeights]] = OrderedDict()
        self._fds: dict[str, int] = {}

    def has(self, key: Key) -> bool:
        return key in self.lru

    def read(self, key: Key) -> ExpertWeights:
        return self._entry(key)[0]

    def read_cpu(self, key: Key) -> ExpertWeights:
        return self._entry(key)[1]

    def _entry(self, key: Key) -> tuple[ExpertWeights, ExpertWeights]:
        entry = self.lru.get(key)
        if entry is not None:
            self.lru.move_to_end(key)
            return entry
        st = self.stacks[key[0]]
        raws = tuple(self._read_slice(ref, key[1]) for ref in (st.gate, st.up, st.down))
        if self.on_read is not None:
            self.on_read(key[0], sum(r.nbytes for r in raws))
        ex = self.build(raws, st)
        if self.pin:
            ex = ex.pin_memory()
        entry = (ex, self.build_cpu(raws, st) if self.build_cpu else ex)
        while len(self.lru) >= self.capacity:
            self.lru.popitem(last=False)  # users still holding it keep it alive; only the LRU forgets it
        self.lru[key] = entry
        return entry

    def _read_slice(self, ref: object, e: int) -> np.ndarray:
        path = getattr(ref.data, "filename", None)  # numpy memmap views remember their file
        if not path:
            return np.array(ref.slice_bytes(e))  # copy out of the mmap: page faults do the reading
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        per = ref.nbytes // ref.shape[0]
        offset = ref.slice_offset(e)
        buf = os.pread(fd, per, offset)
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            # make the next read of these bytes come from the disk again (honest disk-tier benchmarks)
            os.posix_fadvise(fd, offset, per, os.POSIX_FADV_DONTNEED)
        return np.frombuffer(buf, dtype=np.uint8)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
