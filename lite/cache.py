"""MLA's latent cache: per layer and token, the RMS-normed compressed KV and the rotated shared rope key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lite.config import ModelArgs
from quant.formats import FLOAT_TYPES
from quant.prefill import gemm_dtype


def default_cache_dtype(
    device: torch.device | str, dtype: torch.dtype = torch.float32, quantized: bool = False
) -> torch.dtype:
    """The latent cache's default dtype: bf16 on CUDA (half the bytes, tensor cores); on the CPU, bf16 for a model
    with quantized weights where the CPU multiplies bf16 natively (AVX512-BF16 / AMX: attention over a 2K prompt
    runs ~1.4x faster and the cache takes half the memory, as llama.cpp's f16 cache), else the compute dtype
    (float32 keeps an f32 GGUF exact, and CPUs without bf16 instructions multiply bf16 slowly)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if dtype == torch.float32 and quantized:
        return gemm_dtype()
    return dtype


def is_quantized(tensors: Mapping[str, Any]) -> bool:
    """Whether any weight of a GGUF's tensors (`quant.gguf_file.TensorRef`s) is in a block type (not F32/F16/BF16)."""
    return any(getattr(t, "qtype", None) not in (None, *FLOAT_TYPES) for t in tensors.values())


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
