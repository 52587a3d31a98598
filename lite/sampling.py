"""Sampling: temperature, top-k, top-p, min-p and repeat penalty, in llama.cpp's order."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float, last_n: int) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of recently seen tokens by `penalty`, as llama.cpp does."""
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    recent = torch.tensor(sorted(set(history[-last_n:])), dtype=torch.long, device=logits.device)
    picked = logits[recent]
    logits = logits.clone()
    logits[recent] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """The distribution that `sample` draws from: [vocab] float32, zeros outside the kept set."""
    logits = apply_repeat_penalty(logits.float(), history or [], params.repeat_penalty, params.repeat_last_n)
    if params.temperature <= 0:
        probs = torch.zeros_like(logits)
        probs[int(torch.argmax(logits))] = 1.0
        return probs
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        drop_sorted = cumulative - sorted_p >= params.top_p  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from `logits` [vocab]. Greedy when temperature <= 0."""
    if params.temperature <= 0:
        logits = apply_repeat_penalty(logits.float(), history or [], params.repeat_penalty, params.repeat_last_n)
        return int(torch.argmax(logits))
    probs = probabilities(logits, params, history)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
