"""GGUF tensors (llama.cpp names) → the model's `Weights`, plus the routed-expert stacks for the expert backend.

A tensor source is any mapping name → `quant.gguf_file.TensorRef` (raw bytes, qtype, torch-order shape):
a `GGUFFile`'s `.tensors`, or an in-memory one (tests/hf_helpers.py). Attention reads the split `attn_k_b`/`attn_v_b`
layout and also the legacy single `attn_kv_b`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from lite.config import ModelArgs
from lite.errors import LiteError
from lite.model import AttentionWeights, LayerWeights, MLPWeights, Weights
from offload.experts import ExpertStacks
from quant.formats import dequantize
from quant.gguf_file import TensorRef
from quant.qmatrix import QMatrix, device_kernels_forced


def split_kv_b(
    kv_b: torch.Tensor, n_heads: int, qk_nope_head_dim: int, v_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b (n_head·(nope+v), kv_lora) → k_b (n_head, kv_lora, nope), v_b (n_head, v, kv_lora), as llama.cpp.

    The loader splits a legacy file's `attn_kv_b` with it, and the converter an HF `kv_b_proj`: one function, so
    both give the same layout."""
    kv_b = kv_b.reshape(n_heads, qk_nope_head_dim + v_head_dim, kv_b.shape[-1])
    k_b, v_b = torch.split(kv_b, [qk_nope_head_dim, v_head_dim], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


class Embedding:
    """Token embedding kept in its GGUF form (memory-mapped); only the looked-up rows are dequantized."""

    def __init__(self, ref: TensorRef, device: torch.device | str, dtype: torch.dtype):
        self.ref, self.device, self.dtype = ref, torch.device(device), dtype
        self.rows = ref.data.reshape(ref.shape[0], -1)  # [vocab, bytes per row]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.cpu().numpy()
        raw = np.ascontiguousarray(self.rows[ids])  # a copy of T rows
        x = dequantize(raw.reshape(-1), self.ref.qtype, (len(ids), self.ref.shape[1]))  # [T, hidden]
        return x.to(device=self.device, dtype=self.dtype)


class Concat:
    """Rows of several matrices as one Linear, for parts QMatrix.cat cannot join (different layouts)."""

    def __init__(self, parts: list[QMatrix]):
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse(parts: list[QMatrix]) -> QMatrix | Concat:
    """One matrix computing all `parts` at once (stacked along out); a Concat where their layouts differ."""
    try:
        return QMatrix.cat(parts)
    except ValueError:
        return Concat(parts)


class _Reader:
    def __init__(self, tensors: Mapping[str, TensorRef], device: torch.device, dtype: torch.dtype):
        self.tensors, self.device, self.dtype = tensors, device, dtype

    def ref(self, name: str, shape: tuple[int, ...] | None = None) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise LiteError(f"the GGUF lacks tensor {name!r}; the file is incomplete or not a deepseek2 model")
        if shape is not None and tuple(ref.shape) != tuple(shape):
            raise LiteError(f"tensor {name!r} has shape {tuple(ref.shape)}, the metadata implies {tuple(shape)}")
        return ref

    def dense(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        ref = self.ref(name, shape)
        return dequantize(ref.data, ref.qtype, ref.shape).to(device=self.device, dtype=dtype or self.dtype)

    def linear(self, name: str, shape: tuple[int, int]) -> QMatrix:
        ref = self.ref(name, shape)
        return QMatrix.from_gguf(ref.data, ref.qtype, tuple(ref.shape), self.device, self.dtype)


def load_weights(
    args: ModelArgs, tensors: Mapping[str, TensorRef], device: torch.device | str, dtype: torch.dtype
) -> tuple[Weights, dict[int, ExpertStacks]]:
    """Build the resident weights (dense ones on `device`) and collect each MoE layer's expert stacks."""
    rd = _Reader(tensors, torch.device(device), dtype)
    if rd.device.type == "cuda" or device_kernels_forced():  # every matrix is multiplied by the device kernels
        from quant import device_kernels

        for name, ref in tensors.items():
            if len(ref.shape) >= 2 and name != "token_embd.weight":  # the embedding stays on the CPU
                device_kernels.check_supported(ref.qtype, name)
    d, H = args.hidden_size, args.num_attention_heads
    n, p, v, r = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    layers, stacks = [], {}
    for i in range(args.num_hidden_layers):
        b = f"blk.{i}."
        if f"{b}attn_k_b.weight" in tensors:
            k_b = rd.dense(b + "attn_k_b.weight", (H, r, n))  # [H, r, n]
            v_b = rd.dense(b + "attn_v_b.weight", (H, v, r))  # [H, v, r]
        else:  # legacy layout: one kv_b [H·(n+v), r]
            k_b, v_b = split_kv_b(rd.dense(b + "attn_kv_b.weight", (H * (n + v), r)), H, n, v)
        lora = args.q_lora_rank
        if lora is None:
            q, q_dim = rd.linear(b + "attn_q.weight", (H * (n + p), d)), H * (n + p)
        else:
            q, q_dim = rd.linear(b + "attn_q_a.weight", (lora, d)), lora
        attn = AttentionWeights(
            norm=rd.dense(b + "attn_norm.weight", (d,)),
            q_kv_a=fuse([q, rd.linear(b + "attn_kv_a_mqa.weight", (r + p, d))]),
            q_dim=q_dim,
            q_a_norm=rd.dense(b + "attn_q_a_norm.weight", (lora,)) if lora else None,
            q_b=rd.linear(b + "attn_q_b.weight", (H * (n + p), lora)) if lora else None,
            kv_a_norm=rd.dense(b + "attn_kv_a_norm.weight", (r,)),
            k_b=k_b.transpose(1, 2).contiguous(),  # [H, n, r]
            v_b=v_b.transpose(1, 2).contiguous(),  # [H, r, v]
            out=rd.linear(b + "attn_output.weight", (d, H * v)),
        )
        ffn_norm = rd.dense(b + "ffn_norm.weight", (d,))
        if not args.is_moe_layer(i):
            ff = args.intermediate_size
            mlp = MLPWeights(
                fuse([rd.linear(b + "ffn_gate.weight", (ff, d)), rd.linear(b + "ffn_up.weight", (ff, d))]),
                rd.linear(b + "ffn_down.weight", (d, ff)),
            )
            layers.append(LayerWeights(attn, ffn_norm, mlp, None, None))
            continue
        E, ff = args.n_routed_experts, args.moe_intermediate_size
        router = rd.dense(b + "ffn_gate_inp.weight", (E, d), dtype=torch.float32)
        bias_name = b + "exp_probs_b.bias"  # V3's e_score_correction_bias: ranks experts, does not weight them
        bias = rd.dense(bias_name, (E,), dtype=torch.float32) if bias_name in tensors else None
        shared = None
        if args.n_shared_experts:
            sff = ff * args.n_shared_experts
            gate, up = rd.linear(b + "ffn_gate_shexp.weight", (sff, d)), rd.linear(b + "ffn_up_shexp.weight", (sff, d))
            shared = MLPWeights(fuse([gate, up]), rd.linear(b + "ffn_down_shexp.weight", (d, sff)))
        stacks[i] = ExpertStacks(
            rd.ref(b + "ffn_gate_exps.weight", (E, ff, d)),
            rd.ref(b + "ffn_up_exps.weight", (E, ff, d)),
            rd.ref(b + "ffn_down_exps.weight", (E, d, ff)),
        )
        layers.append(LayerWeights(attn, ffn_norm, None, router, shared, bias))
    output_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied embeddings
    weights = Weights(
        embed=Embedding(rd.ref("token_embd.weight", (args.vocab_size, d)), device, dtype),
        layers=layers,
        norm=rd.dense("output_norm.weight", (d,)),
        output=rd.linear(output_name, (args.vocab_size, d)),
    )
    return weights, stacks
