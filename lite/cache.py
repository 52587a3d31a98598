"""MLA's latent cache: per layer and token, the RMS-normed compressed KV and the rotated shared rope key."""

from __future__ import annotations

import torch

from lite.config import ModelArgs


def default_cache_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (half the bytes, tensor cores), float32 on CPU (exact, and CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class LatentCache:
    """Holds exactly kv_lora_rank + qk_rope_head_dim values per layer and token, preallocated for `ctx` tokens.

    Row layout: [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim)]. Attention reads it as one shared key
    (the whole row) and one shared value (the c_kv part), so nothing is ever decompressed per step.
    """

    def __init__(
        self,
        args: ModelArgs,
        ctx: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.ctx = ctx
        self.kv_lora_rank = args.kv_lora_rank
        self.dtype = dtype or default_cache_dtype(device)
        self.data = torch.zeros(args.num_hidden_layers, ctx, args.latent_dim, device=device, dtype=self.dtype)

    def write(self, layer: int, start: int, latent: torch.Tensor) -> torch.Tensor:
        """Store latent [T, latent_dim] at positions start..start+T; return the layer's rows 0..start+T (a view)."""
        end = start + latent.shape[0]
        rows = self.data[layer]
        rows[start:end] = latent
        return rows[:end]

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.data.shape[-1] * self.data.element_size()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
