"""Hugging Face DeepSeek-V2/V3 tensor names → llama.cpp GGUF tensor names, and the tensor surgery between them.

Names come from `gguf.get_tensor_name_map(MODEL_ARCH.DEEPSEEK2, n_layers)`. Two tensors are reshaped the way
llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model.modify_tensors) does:
- routed experts are stacked per layer: `blk.N.ffn_{gate,up,down}_exps.weight`, torch shape (n_expert, out, in);
- `kv_b_proj` (n_head·(nope+v), kv_lora) is split per head into
  `attn_k_b` (n_head, kv_lora, nope) — transposed, so the query can absorb it — and `attn_v_b` (n_head, v, kv_lora).
Legacy files keep the single `attn_kv_b` (n_head·(nope+v), kv_lora); `lite.weights.split_kv_b` (the loader's,
shared so both sides agree) turns it into the pair.
DeepSeek-V3's `mlp.gate.e_score_correction_bias` (n_expert) becomes `blk.N.exp_probs_b.bias`; FP8 checkpoints'
`*.weight_scale_inv` belong to their weight (`fp8.py`) and make no tensor of their own.

The converter streams with `plan_tensors` (which HF tensors make each GGUF tensor) and `build_tensor`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import torch

from lite.config import ModelArgs
from lite.convert.fp8 import SCALE_SUFFIX
from lite.errors import LiteError
from lite.weights import split_kv_b

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")  # transformers-5 in-memory
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
ROUTER_BIAS = "e_score_correction_bias"  # llama.cpp renames it "e_score_correction.bias" → blk.N.exp_probs_b.bias


def expert_stack_name(layer: int, proj: str) -> str:
    """`blk.{layer}.ffn_{proj}_exps.weight` for proj in gate/up/down."""
    return f"blk.{layer}.ffn_{proj}_exps.weight"


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor and how to make it from HF tensors (`build_tensor`)."""

    name: str  # GGUF name
    sources: tuple[str, ...]  # HF tensor names, in the order build_tensor takes them
    kind: str  # "copy" | "stack" | "k_b" | "v_b" | "fused_gate" | "fused_up"
    shape: tuple[int, ...]  # output shape, torch order


def plan_tensors(
    hf_shapes: dict[str, tuple[int, ...]], args: ModelArgs, tie_word_embeddings: bool = False
) -> list[TensorPlan]:
    """The GGUF tensors made from an HF checkpoint with these tensor shapes, in output order.

    Skips MTP layers (index ≥ num_hidden_layers), rotary buffers, FP8 scales (read with their weight), and lm_head
    when tied to the embeddings.
    Raises LiteError for a tensor llama.cpp has no name for, or a layer missing some of its experts.
    """
    n_layers = args.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)
    plans: list[tuple[tuple[int, int], TensorPlan]] = []  # (sort key, plan)
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name, shape in hf_shapes.items():
        shape = tuple(shape)
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else -1
        if layer >= n_layers or name.endswith(("rotary_emb.inv_freq", SCALE_SUFFIX)):
            continue  # MTP layers and rotary buffers: llama.cpp skips them too; FP8 scales go with their weight
        order = (layer + 1 if layer >= 0 else (0 if "embed" in name else n_layers + 1), len(plans))
        if e := _EXPERT.match(name):
            experts.setdefault((int(e.group(1)), e.group(3)), {})[int(e.group(2))] = name
            continue
        if f := _FUSED_EXPERTS.match(name):
            if f.group(2) == "down":
                plans.append((order, TensorPlan(expert_stack_name(layer, "down"), (name,), "copy", shape)))
            else:
                half = (shape[0], shape[1] // 2, shape[2])
                plans.append((order, TensorPlan(expert_stack_name(layer, "gate"), (name,), "fused_gate", half)))
                plans.append((order, TensorPlan(expert_stack_name(layer, "up"), (name,), "fused_up", half)))
            continue
        if name.endswith("kv_b_proj.weight"):
            h, nope, v = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim
            if shape != (h * (nope + v), args.kv_lora_rank):
                raise LiteError(
                    f"{name} has shape {shape}, but config.json implies {(h * (nope + v), args.kv_lora_rank)}"
                )
            plans.append(
                (order, TensorPlan(f"blk.{layer}.attn_k_b.weight", (name,), "k_b", (h, args.kv_lora_rank, nope)))
            )
            plans.append((order, TensorPlan(f"blk.{layer}.attn_v_b.weight", (name,), "v_b", (h, v, args.kv_lora_rank))))
            continue
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        out = name_map.get_name(name.replace(ROUTER_BIAS, "e_score_correction.bias"), try_suffixes=(".weight", ".bias"))
        if out is None:
            raise LiteError(f"tensor {name!r} has no llama.cpp name; is this a DeepSeek-V2/V3 checkpoint?")
        plans.append((order, TensorPlan(out, (name,), "copy", shape)))
    for (layer, proj), by_id in sorted(experts.items()):
        if len(by_id) != args.n_routed_experts:
            missing = sorted(set(range(args.n_routed_experts)) - set(by_id))
            raise LiteError(f"layer {layer} lacks {proj}_proj of experts {missing[:5]}; the checkpoint is incomplete")
        sources = tuple(by_id[i] for i in range(args.n_routed_experts))
        shape = (args.n_routed_experts, *hf_shapes[sources[0]])
        plans.append(((layer + 1, -1), TensorPlan(expert_stack_name(layer, proj), sources, "stack", shape)))
    return [p for _, p in sorted(plans, key=lambda x: x[0])]


def build_tensor(plan: TensorPlan, tensors: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """Make the GGUF tensor of `plan` from its source tensors (in `plan.sources` order)."""
    if plan.kind == "copy":
        out = tensors[0]
    elif plan.kind == "stack":
        out = torch.stack(tensors, dim=0)  # [n_expert, out, in]
    elif plan.kind in ("k_b", "v_b"):
        k_b, v_b = split_kv_b(tensors[0], args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim)
        out = k_b if plan.kind == "k_b" else v_b
    elif plan.kind in ("fused_gate", "fused_up"):
        gate, up = tensors[0].chunk(2, dim=1)  # [n_expert, 2·inter, hidden] → two [n_expert, inter, hidden]
        out = (gate if plan.kind == "fused_gate" else up).contiguous()
    else:
        raise ValueError(plan.kind)
    if tuple(out.shape) != plan.shape:
        raise LiteError(f"{plan.sources[0]} gives shape {tuple(out.shape)} for {plan.name}, expected {plan.shape}")
    return out
