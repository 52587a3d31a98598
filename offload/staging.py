"""Pinned staging for host -> device copies (mechanism only).

An expert's bytes live in pageable memory (the GGUF's mmap, or the disk tier's buffers), and only pinned memory
can be copied to the GPU asynchronously. So each copy goes through one buffer of a fixed ring: a host memcpy into
it, then a DMA to the device slot on the copy stream. The ring is allocated once. Per-expert pinned allocations
would cost a cudaHostAlloc each, and PyTorch's pinned allocator rounds each one up to a power of two.
"""

from __future__ import annotations

import threading

import torch


class StagingRing:
    """`n` host buffers of `nbytes` each, handed out in turn; a buffer is reused once the copy reading it is done."""

    def __init__(self, n: int, nbytes: int, pin: bool):
        self.buffers = torch.empty((n, nbytes), dtype=torch.uint8, pin_memory=pin)
        self.done: list[torch.cuda.Event | None] = [None] * n
        self.busy = [False] * n  # taken and not yet released (being filled)
        self.next = 0
        self.cond = threading.Condition()  # the main thread (RAM tier) and the worker (disk tier) both stage

    @property
    def nbytes(self) -> int:
        return int(self.buffers.nbytes)

    def take(self) -> tuple[int, torch.Tensor]:
        """The next buffer (index, uint8 [nbytes]), after the copy that last read it has finished."""
        with self.cond:
            i = self.next
            self.next = (i + 1) % len(self.done)
            while self.busy[i]:
                self.cond.wait()
            self.busy[i] = True
            event, self.done[i] = self.done[i], None
        if event is not None:
            event.synchronize()
        return i, self.buffers[i]

    def release(self, i: int, event: torch.cuda.Event | None) -> None:
        """Buffer `i` is being read by the copy that records `event`."""
        with self.cond:
            self.done[i], self.busy[i] = event, False
            self.cond.notify_all()
