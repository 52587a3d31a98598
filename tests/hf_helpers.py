"""Test-only readers of a Hugging Face checkpoint, through the converter's own code (no GGUF file written).

- `tokenizer_from_hf`: the `Tokenizer` that the converter's `tokenizer.*` metadata for the folder gives;
- `tensors_from_hf`: an in-memory F32 tensor source (GGUF names → TensorRef) for `lite.weights`;
- `merge_kv_b`: the inverse of `lite.weights.split_kv_b`, to build legacy `attn_kv_b` files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lite.config import ModelArgs
from lite.convert import fp8
from lite.convert.names import build_tensor, plan_tensors
from lite.convert.tokenizer_meta import tokenizer_metadata_from_hf
from lite.tokenizer import Tokenizer
from quant.gguf_file import TensorRef


def tokenizer_from_hf(hf_dir: str | os.PathLike[str]) -> Tokenizer:
    """From an HF checkpoint's tokenizer.json + tokenizer_config.json, read exactly as the converter writes it."""
    return Tokenizer.from_metadata(tokenizer_metadata_from_hf(Path(hf_dir)))


def tensors_from_hf(hf_dir: str | os.PathLike[str], args: ModelArgs) -> dict[str, TensorRef]:
    """An in-memory F32 tensor source from an HF checkpoint, through the converter's name mapping.
    FP8 weights are dequantized with their block scales, as the converter does."""
    block = fp8.block_size(json.loads((Path(hf_dir) / "config.json").read_text())) or fp8.DEFAULT_BLOCK
    handles = [safe_open(str(f), "pt") for f in sorted(Path(hf_dir).glob("*.safetensors"))]
    where = {name: h for h in handles for name in h.keys()}
    shapes = {name: tuple(h.get_slice(name).get_shape()) for name, h in where.items()}

    def read(name: str) -> torch.Tensor:
        scale = fp8.scale_name(name)
        if scale in where:
            return fp8.dequantize(where[name].get_tensor(name), where[scale].get_tensor(scale), block)
        return where[name].get_tensor(name).float()

    out = {}
    for plan in plan_tensors(shapes, args):
        t = build_tensor(plan, [read(s) for s in plan.sources], args)
        raw = np.ascontiguousarray(t.numpy(), dtype=np.float32).reshape(-1).view(np.uint8)
        out[plan.name] = TensorRef(plan.name, gguf.GGMLQuantizationType.F32, tuple(t.shape), raw, 0)
    return out


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_kv_b`: (n_head, kv_lora, nope) + (n_head, v, kv_lora) → (n_head·(nope+v), kv_lora)."""
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [n_head, nope+v, kv_lora]
    return kv_b.reshape(-1, kv_b.shape[-1])
