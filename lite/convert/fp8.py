"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1's official weights): e4m3 weights with float32 `weight_scale_inv`.

Each `X.weight` [out, in] in float8 comes with `X.weight_scale_inv` [ceil(out/b0), ceil(in/b1)] (b0 × b1 = 128 × 128,
`quantization_config.weight_block_size`); the weight is `float32(X.weight) · scale_inv` of its block, with the
scales of a partial edge block cut off. This is exactly the arithmetic of DeepSeek's `weight_dequant` and of
llama.cpp's converter (`dequant_simple`): the float8 → float32 conversion is exact and the product is one float32
rounding, so the dequantized weights, and the GGUF made from them, are bit-identical to theirs.
"""

from __future__ import annotations

from typing import Any

import torch

from lite.errors import LiteError

SCALE_SUFFIX = "_scale_inv"  # "X.weight" → "X.weight_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype names
DEFAULT_BLOCK = (128, 128)


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The (rows, cols) scale block of an FP8 checkpoint's config.json, None without quantization_config.

    Raises LiteError for a quantization method lite cannot dequantize."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "fp8":
        raise LiteError(
            f"config.json's quantization_config.quant_method is {method!r}; lite converts unquantized checkpoints "
            "and block-scaled fp8 ones (DeepSeek-V3/R1) only"
        )
    block = q.get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or min(block) < 1:
        raise LiteError(f"quantization_config.weight_block_size {block!r} is not a pair of positive sizes")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The `weight_scale_inv` shape of a weight [out, in]: one scale per block, edge blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], row0: int = 0) -> torch.Tensor:
    """Rows row0.. of an FP8 weight, w [rows, in] (float8), with the whole weight's scale_inv [R/b0, in/b1]
    -> float32 [rows, in]: each element times its block's scale."""
    if w.dim() != 2:
        raise LiteError(f"an fp8 weight of shape {tuple(w.shape)}: lite dequantizes 2-D (linear) fp8 weights only")
    rows = torch.arange(row0, row0 + w.shape[0]) // block[0]  # [rows]: each row's block row
    cols = torch.arange(w.shape[1]) // block[1]  # [in]: each column's block column
    return w.float() * scale_inv.float()[rows][:, cols]
