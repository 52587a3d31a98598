"""Chunked perplexity in the manner of llama.cpp's llama-perplexity.

The token stream is cut into non-overlapping chunks of `ctx` tokens. Each chunk is evaluated from an empty
cache with its first token replaced by BOS (when the model adds one), and only the second half is scored:
the logits at positions first .. ctx-2 (first = ctx // 2) predict tokens first+1 .. ctx-1, so every scored
token sees at least ctx/2 tokens of context. Perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lite.errors import LiteError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float  # llama.cpp's uncertainty estimate: ppl × standard error of the mean NLL
    nll: float  # mean negative log-likelihood (nats per token)
    tokens_scored: int
    chunks: int
    ctx: int
    chunk_ppl: list[float] = field(default_factory=list)  # running perplexity after each chunk


def chunk_nll(session: Any, chunk: list[int], score_block: int = 256) -> torch.Tensor:
    """Negative log-likelihoods [len(chunk) - 1 - first] of the second half of `chunk`, from an empty cache."""
    ctx, first = len(chunk), len(chunk) // 2
    session.reset()
    if first > 0:
        session.feed(chunk[:first])  # the first half is context only; its logits are not needed
    nll = []
    for start in range(first, ctx - 1, score_block):
        stop = min(start + score_block, ctx - 1)
        logits = session.feed(chunk[start:stop], all_logits=True)  # [stop - start, vocab]
        logp = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(chunk[start + 1 : stop + 1], dtype=torch.long, device=logp.device)
        nll.append(-logp.gather(1, targets[:, None])[:, 0].cpu())
    return torch.cat(nll) if nll else torch.zeros(0, dtype=torch.float64)


def perplexity(
    model: Any,
    tokens: list[int],
    ctx: int,
    chunks: int | None = None,
    bos_id: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` over `tokens` in chunks of `ctx`; `progress(done, total, running_ppl)`."""
    if ctx < 4:
        raise LiteError(f"a chunk of {ctx} tokens is too small; use at least 4 tokens")
    n_max = len(tokens) // ctx
    if n_max < 1:
        raise LiteError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}; use smaller chunks")
    if chunks is not None and chunks < 1:
        raise LiteError(f"chunks must be at least 1 (None scores every chunk), got {chunks}")
    n = n_max if chunks is None else min(chunks, n_max)
    session = model.session(ctx)
    total = total_sq = 0.0
    count = 0
    running: list[float] = []
    for i in range(n):
        chunk = list(tokens[i * ctx : (i + 1) * ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        nll = chunk_nll(session, chunk)
        total += float(nll.sum())
        total_sq += float((nll * nll).sum())
        count += nll.numel()
        running.append(math.exp(total / count))
        if progress:
            progress(i + 1, n, running[-1])
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    sem = math.sqrt(var / (count - 1)) if count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * sem, mean, count, n, ctx, running)
