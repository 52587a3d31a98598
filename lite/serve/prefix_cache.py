"""A byte-bounded LRU of latent-cache snapshots keyed by their token prefix.

MLA's latent cache is small (layers × (kv_lora_rank + qk_rope_head_dim) values per token: about 30 KB per
token for DeepSeek-V2-Lite in bf16), so whole conversations can be kept. The server holds one working
`Session`; when a request would overwrite what it holds (another conversation), the rows are saved here first,
and a later request whose tokens start with a saved prefix gets those rows copied back instead of prefilled.
Snapshots live in CPU memory (on CUDA they do not compete with the expert cache for device memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists, by C-speed slice comparisons (binary search)."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Latent-cache bytes of one token: layers × (kv_lora_rank + qk_rope_head_dim) × dtype bytes."""
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * latent * dtype.itemsize


@dataclass
class Entry:
    tokens: list[int]
    rows: torch.Tensor  # [layers, len(tokens), latent_dim], on the CPU

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + 8 * len(self.tokens)


class PrefixCache:
    """Snapshots of latent caches, least recently used evicted first so that they hold at most `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0
        self.counters = {"stored": 0, "restored": 0, "evicted": 0, "restored_tokens": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length ((None, 0) if none shares any)."""
        best, best_n = None, 0
        for entry in reversed(self._entries.values()):  # most recent first: it wins ties
            n = common_prefix(entry.tokens, tokens)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def store(self, tokens: Sequence[int], rows: torch.Tensor) -> bool:
        """Keep a snapshot of `rows` [layers, len(tokens), latent] for `tokens` (copied to the CPU). Entries it
        extends are dropped; nothing is stored if an entry already extends it or it alone exceeds the budget."""
        tokens = list(tokens)
        if not tokens:
            return False
        for key, entry in list(self._entries.items()):
            n = common_prefix(entry.tokens, tokens)
            if n == len(tokens):  # already held, as this or a longer conversation
                self._entries.move_to_end(key)
                return False
            if n == len(entry.tokens):  # the new one extends it
                self._drop(key)
        entry = Entry(tokens, rows.detach().to("cpu", copy=True))
        if entry.nbytes > self.max_bytes:
            return False
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.counters["evicted"] += 1
        self._entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        self.counters["stored"] += 1
        return True

    def restore(self, entry: Entry, session: Any, n: int) -> None:
        """Make `session` hold the first `n` tokens of `entry` (their rows copied into its latent cache); the
        entry becomes the most recently used."""
        session.cache.data[:, :n].copy_(entry.rows[:, :n])
        session.tokens[:] = entry.tokens[:n]
        for key, e in self._entries.items():
            if e is entry:
                self._entries.move_to_end(key)
                break
        self.counters["restored"] += 1
        self.counters["restored_tokens"] += n

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes, **self.counters}
