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
    blocks: list[int]  # pool blocks holding the rows of tokens[i * block : (i + 1) * block]


class PrefixCache:
    """Snapshots of latent caches in a pool of fixed-size blocks (`block_tokens` tokens each) that holds at most
    `max_bytes`, the least recently used snapshot evicted first.

    The pool (CPU memory, allocated at the first `store`, its pages touched as they fill) never changes size, so
    the process's memory stays flat however the snapshots churn (separate tensors of every size fragment the heap).
    """

    def __init__(self, max_bytes: int, block_tokens: int = 64):
        self.max_bytes, self.block = int(max_bytes), block_tokens
        self.pool: torch.Tensor | None = None  # [n_blocks, layers, block_tokens, latent]
        self._free: list[int] = []
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.counters = {"stored": 0, "restored": 0, "evicted": 0, "restored_tokens": 0}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def block_bytes(self) -> int:
        return 0 if self.pool is None else self.pool[0].numel() * self.pool.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks the snapshots occupy."""
        return 0 if self.pool is None else (self.pool.shape[0] - len(self._free)) * self.block_bytes

    def match(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length ((None, 0) if none shares any)."""
        best, best_n = None, 0
        for entry in reversed(self._entries.values()):  # most recent first: it wins ties
            n = common_prefix(entry.tokens, tokens)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def store(self, tokens: Sequence[int], rows: torch.Tensor) -> bool:
        """Keep a copy of `rows` [layers, len(tokens), latent] for `tokens`. Entries it extends are dropped;
        nothing is stored if an entry already extends it or it needs more blocks than the whole pool."""
        tokens, B = list(tokens), self.block
        if not tokens or not self._ensure_pool(rows):
            return False
        need = -(-len(tokens) // B)
        assert self.pool is not None  # _ensure_pool made it
        if need > self.pool.shape[0]:
            return False
        for key, entry in list(self._entries.items()):
            n = common_prefix(entry.tokens, tokens)
            if n == len(tokens):  # already held, as this or a longer conversation
                self._entries.move_to_end(key)
                return False
            if n == len(entry.tokens):  # the new one extends it
                self._drop(key)
        while len(self._free) < need:
            self._drop(next(iter(self._entries)))
            self.counters["evicted"] += 1
        blocks = [self._free.pop() for _ in range(need)]
        for i, b in enumerate(blocks):
            part = rows[:, i * B : (i + 1) * B]
            self.pool[b, :, : part.shape[1]].copy_(part)
        self._entries[self._next] = Entry(tokens, blocks)
        self._next += 1
        self.counters["stored"] += 1
        return True

    def restore(self, entry: Entry, session: Any, n: int) -> None:
        """Make `session` hold the first `n` tokens of `entry` (their rows copied into its latent cache); the
        entry becomes the most recently used."""
        B, pool = self.block, self.pool
        assert pool is not None  # an entry implies the pool
        for i, b in enumerate(entry.blocks[: -(-n // B)]):
            k = min(B, n - i * B)
            session.cache.data[:, i * B : i * B + k].copy_(pool[b, :, :k])
        session.tokens[:] = entry.tokens[:n]
        for key, e in self._entries.items():
            if e is entry:
                self._entries.move_to_end(key)
                break
        self.counters["restored"] += 1
        self.counters["restored_tokens"] += n

    def _ensure_pool(self, rows: torch.Tensor) -> bool:
        layers, _, latent = rows.shape
        if self.pool is None:
            block_bytes = layers * self.block * latent * rows.element_size()
            n_blocks = self.max_bytes // block_bytes
            if n_blocks == 0:
                return False
            self.pool = torch.empty(n_blocks, layers, self.block, latent, dtype=rows.dtype)
            self._free = list(range(n_blocks - 1, -1, -1))
        return self.pool.shape[1:] == (layers, self.block, latent) and self.pool.dtype == rows.dtype

    def _drop(self, key: int) -> None:
        self._free.extend(self._entries.pop(key).blocks)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
            "block_tokens": self.block, **self.counters,
        }  # fmt: skip
