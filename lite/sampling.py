"""Sampling: repeat penalty, top-k, top-p, min-p, then temperature — llama.cpp's default sampler order.

As in llama.cpp, the filters (top-k, top-p, min-p) look at the untempered distribution and temperature is
applied last to the surviving tokens, so changing the temperature never changes which tokens can be drawn.

Every option is range-checked here, once (`check`), for every caller: the library, the CLI flags and the
chat's `/set`. Within those ranges sampling is always finite: a temperature of 1e-300 is (almost) greedy,
one of 1e300 (almost) uniform over the kept tokens, and a repeat penalty of 1e-30 or 1e30 saturates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import torch

from lite.errors import LiteError

SEED_MAX = 2**64 - 1  # torch.Generator takes 64-bit seeds
_F32_MAX = torch.finfo(torch.float32).max

# option: (kind, low, high, what the bounds mean) — ranges that keep sampling finite
LIMITS: dict[str, tuple[type, float, float, str]] = {
    "temperature": (float, 0.0, math.inf, "a finite number >= 0 (0 = greedy)"),
    "top_k": (int, 0, math.inf, "a whole number >= 0 (0 = off)"),
    "top_p": (float, 0.0, 1.0, "a number from 0 to 1 (1 = off)"),
    "min_p": (float, 0.0, 1.0, "a number from 0 to 1 (0 = off)"),
    "repeat_penalty": (float, 0.0, math.inf, "a finite number > 0 (1 = off)"),
    "repeat_last_n": (int, -1, math.inf, "a whole number >= -1 (-1 = the whole history, 0 = off)"),
    "seed": (int, 0, SEED_MAX, f"a whole number from 0 to {SEED_MAX}"),
    "max_tokens": (int, 1, math.inf, "a whole number >= 1"),
    "frequency_penalty": (float, -math.inf, math.inf, "a finite number"),
    "presence_penalty": (float, -math.inf, math.inf, "a finite number"),
}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """`value` for the option `name` (a key of LIMITS; a string is parsed), converted to its type and
    range-checked. Raises LiteError naming `label` (default: `name`), e.g. a CLI flag or a /set name."""
    kind, low, high, what = LIMITS[name]
    if name == "seed" and value is None:
        return None
    shown = repr(value) if isinstance(value, str) else str(value)
    error = LiteError(f"{label or name} must be {what}, got {shown}")
    v = value
    if isinstance(v, str):
        try:
            v = int(v.strip()) if kind is int else float(v.strip())
        except ValueError:
            raise error from None
    if isinstance(v, bool) or not isinstance(v, Real):
        raise error
    if kind is int:
        if not isinstance(v, Integral) and not (math.isfinite(v) and float(v).is_integer()):
            raise error
        v = int(v) if isinstance(v, Integral) else int(float(v))
    else:
        v = float(v)
        if not math.isfinite(v):
            raise error
    if (v <= low if name == "repeat_penalty" else v < low) or v > high:
        raise error
    return v


# SamplingParams field -> the GGUF key holding the model's recommended value (as llama.cpp reads them)
METADATA_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repeat_penalty": "general.sampling.penalty_repeat",
    "repeat_last_n": "general.sampling.penalty_last_n",
}


@dataclass
class SamplingParams:
    """Sampling options; every value is checked on construction (`check`). Use `replace`-style construction
    or `check` before assigning a field by hand."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window (OpenAI's and llama.cpp's)
    presence_penalty: float = 0.0  # subtracted once from every token in the window

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name)))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None, **overrides: Any) -> SamplingParams:
        """The model's recommended values (its GGUF's `general.sampling.*`) with `overrides` on top (None means
        not given), lite's defaults for the rest. A bad value in the file raises LiteError naming its key."""
        values = {name: v for name, v in overrides.items() if v is not None}
        for name, key in METADATA_KEYS.items():
            if name not in values and metadata and metadata.get(key) is not None:  # a value given wins, unread
                values[name] = check(name, metadata[key], f"the model's {key}")
        return cls(**values)


def apply_repeat_penalty(
    logits: torch.Tensor,
    history: list[int],
    penalty: float,
    last_n: int,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of recently seen tokens by `penalty`, then subtract
    `frequency` x their count and `presence` once, over the same last `last_n` tokens, as llama.cpp does.
    Results are kept finite (a token already at -inf stays there)."""
    if (penalty == 1.0 and frequency == 0.0 and presence == 0.0) or not history or last_n == 0:
        return logits
    window = history[-last_n:] if last_n > 0 else history  # last_n < 0: the whole history (llama.cpp's -1)
    recent, counts = torch.tensor(window, dtype=torch.long).unique(return_counts=True)
    recent = recent.to(logits.device)
    picked = logits[recent]
    logits = logits.clone()
    penalised = picked
    if penalty != 1.0:
        penalised = torch.where(picked > 0, picked / penalty, picked * penalty)
    if frequency != 0.0 or presence != 0.0:
        penalised = penalised - counts.to(picked.device, picked.dtype) * frequency - presence
    logits[recent] = torch.where(picked == float("-inf"), picked, penalised.clamp(-_F32_MAX, _F32_MAX))
    return logits


def _finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with +inf saturated to the largest float; NaN is an error (a corrupt model)."""
    logits = logits.float()
    if bool(torch.isnan(logits).any()):
        raise LiteError("the model produced NaN logits; the GGUF file is corrupt (a weight holds NaN or Inf)")
    return logits.clamp(max=_F32_MAX)


def penalized(logits: torch.Tensor, params: SamplingParams, history: list[int] | None) -> torch.Tensor:
    """`logits` as finite float32 with the repeat, frequency and presence penalties of `params` applied."""
    return apply_repeat_penalty(
        _finite_logits(logits), history or [], params.repeat_penalty, params.repeat_last_n,
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


def _greedy(logits: torch.Tensor, params: SamplingParams, history: list[int] | None) -> int:
    return int(torch.argmax(penalized(logits, params, history)))


def probabilities(logits: torch.Tensor, params: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """The distribution that `sample` draws from: [vocab] float32, zeros outside the kept set."""
    if params.temperature <= 0:
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        probs[_greedy(logits, params, history)] = 1.0
        return probs
    kept = filtered_logits(logits, params, history).double()
    # in float64, relative to the best token: any temperature in range gives finite values (the best is 0)
    scaled = (kept - kept.max()) / params.temperature
    return torch.softmax(scaled, dim=-1).float()


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from `logits` [vocab]. Greedy when temperature is 0."""
    if params.temperature <= 0:
        return _greedy(logits, params, history)
    probs = probabilities(logits, params, history)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
