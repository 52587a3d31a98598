"""Rotary position embedding as DeepSeek-V2 uses it: interleaved (GPT-J) pairs, optionally YaRN-scaled."""

from __future__ import annotations

import math

import torch

from lite.config import ModelArgs


def inv_frequencies(args: ModelArgs) -> torch.Tensor:
    """[rope_dim / 2] float32 angular frequencies; YaRN blends interpolated and extrapolated ones by a ramp."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_type != "yarn":
        return extrapolated
    assert args.rope_factor is not None and args.rope_original_max_position_embeddings is not None  # yarn
    interpolated = extrapolated / args.rope_factor
    original = args.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low: float = max(math.floor(correction_dim(args.rope_beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(args.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # high-frequency pairs keep their frequency, low ones are interpolated
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


class Rope:
    """Rotations e^{i·pos·freq} (times the YaRN cos/sin scale), grown on demand.

    `rotate(x, cis)` turns each interleaved pair (x[2j], x[2j+1]) of x [T, ..., rope_dim] by cis [T, rope_dim/2].
    """

    def __init__(self, args: ModelArgs, device: torch.device | str = "cpu"):
        self.inv_freq = inv_frequencies(args).to(device)
        self.scale = args.rope_cos_sin_scale()
        self.cis = torch.empty(0, self.inv_freq.numel(), device=device, dtype=torch.complex64)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cis.shape[0], 256)
        positions = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq  # [n, rope_dim / 2]
        self.cis = torch.polar(torch.full_like(angles, self.scale), angles)

    def rotations(self, start: int, length: int) -> torch.Tensor:
        """complex64 [length, rope_dim / 2] for positions start..start+length."""
        if start + length > self.cis.shape[0]:
            self._grow(start + length)
        return self.cis[start : start + length]

    @staticmethod
    def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., d] real with interleaved pairs; cis: [T, d/2] complex, broadcast over the middle axes."""
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [T, ..., d/2]
        cis = cis.view((cis.shape[0],) + (1,) * (x.dim() - 2) + (cis.shape[1],))
        return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)
