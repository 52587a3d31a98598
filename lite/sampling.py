"""Sampling: repeat penalty, top-k, top-p, min-p, then temperature — llama.cpp's default sampler order.

As in llama.cpp, the filters (top-k, top-p, min-p) look at the untempered distribution and temperature is
applied last to the surviving tokens, so changing the temperature never changes which tokens can be drawn.
"""

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
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window (OpenAI's and llama.cpp's)
    presence_penalty: float = 0.0  # subtracted once from every token in the window


def apply_repeat_penalty(
    logits: torch.Tensor,
    history: list[int],
    penalty: float,
    last_n: int,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of recently seen tokens by `penalty`, then subtract
    `frequency` × their count and `presence` once, over the same last `last_n` tokens, as llama.cpp does."""
    if (penalty == 1.0 and frequency == 0.0 and presence == 0.0) or not history or last_n == 0:
        return logits
    window = history[-last_n:] if last_n > 0 else history  # last_n < 0: the whole history (llama.cpp's -1)
    recent, counts = torch.tensor(window, dtype=torch.long).unique(return_counts=True)
    recent = recent.to(logits.device)
    picked = logits[recent]
    logits = logits.clone()
    if penalty != 1.0:
        picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    if frequency != 0.0 or presence != 0.0:
        picked = picked - counts.to(picked.device, picked.dtype) * frequency - presence
    logits[recent] = picked
    return logits


def penalized(logits: torch.Tensor, params: SamplingParams, history: list[int] | None) -> torch.Tensor:
    """`logits` as float32 with the repeat, frequency and presence penalties of `params` applied."""
    return apply_repeat_penalty(
        logits.float(), history or [], params.repeat_penalty, params.repeat_last_n,
        params.frequency_penalty, params.presence_penalty,
    )  # fmt: skip


def filtered_logits(logits: torch.Tensor, params: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """Penalised logits [vocab] with the tokens removed by top-k, top-p and min-p set to -inf (untempered)."""
    logits = penalized(logits, params, history)
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p (>= 1 token)
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """The distribution that `sample` draws from: [vocab] float32, zeros outside the kept set."""
    if params.temperature <= 0:
        logits = penalized(logits, params, history)
        probs = torch.zeros_like(logits)
        probs[int(torch.argmax(logits))] = 1.0
        return probs
    return torch.softmax(filtered_logits(logits, params, history) / params.temperature, dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from `logits` [vocab]. Greedy when temperature <= 0."""
    if params.temperature <= 0:
        logits = penalized(logits, params, history)
        return int(torch.argmax(logits))
    probs = probabilities(logits, params, history)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
