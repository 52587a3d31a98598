"""Recipes: the GGUF type of every tensor of a deepseek2 model. Pure functions of names and shapes.

- `lite` (the default): routed experts Q4_K (Q4_0 where a row is not a whole number of 256-value blocks), every
  other matrix Q8_0, norms and routers F32. The routed experts are ~92% of DeepSeek-V2-Lite's weights and the part
  that is cached, copied and read per token, so they get 4.5 bits; the always-resident rest (attention, shared
  experts, embeddings, head) is small and gets near-lossless 8.5 bits for ~0.7 GB more than 4-bit. Every type it
  writes has native CPU kernels and Triton kernels.
- `q4_k_m`, `q5_k_m`, `q6_k`, `q8_0`: llama.cpp's `llama-quantize` mixes, as its `llama_tensor_get_type` chooses
  for a deepseek2 model without an importance matrix (src/llama-quant.cpp): `output.weight` Q6_K; `ffn_down*`
  and attn_v-like tensors (`attn_kv_b`, not the split `attn_k_b`/`attn_v_b`) Q6_K on the "more bits" layers for
  Q4_K_M/Q5_K_M; with 8 experts `attn_kv_b` Q8_0 and (Q4_K_M) `attn_output` Q5_K; rows that are not whole blocks
  fall back Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, then F16. Files made this way match llama.cpp's tensor by tensor.

`--experts`, `--rest` and `--outtype` override a recipe's choice for the routed experts, the other matrices, or
all weights; an override falls back like the recipe does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import gguf

Q = gguf.GGMLQuantizationType
QK_K = 256
RECIPES = ("lite", "q4_k_m", "q5_k_m", "q6_k", "q8_0")
DEFAULT_RECIPE = "lite"
# --experts / --rest: any type lite writes; --outtype: one type for every weight (norms and routers stay F32).
# `lite convert`'s choices are these tables.
TYPE_NAMES = {
    "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "q4_0": Q.Q4_0, "q5_0": Q.Q5_0, "q8_0": Q.Q8_0,
    "bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32,
}  # fmt: skip
OUTTYPES = ("f32", "bf16", "f16", "q8_0")
# llama.cpp ftype -> its default type and general.file_type
LLAMA_FTYPES = {
    "q4_k_m": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# rows that are not whole blocks: llama.cpp's tensor_type_fallback, and lite's own (Q4_K -> Q4_0)
LLAMA_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
LITE_FALLBACK = {Q.Q4_K: Q.Q4_0, Q.Q5_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


@dataclass(frozen=True)
class Choice:
    wanted: Q  # the recipe's (or override's) type
    qtype: Q  # what is written: `wanted`, or its fallback where rows are not whole blocks


@dataclass(frozen=True)
class Overrides:
    experts: Q | None = None  # routed experts
    rest: Q | None = None  # every other matrix (not norms, not routers)


NO_OVERRIDES = Overrides()


def role_of(name: str, shape: Sequence[int]) -> str:
    """ "expert" (routed experts), "norm" (1-D tensors and norms), "router" (ffn_gate_inp) or "rest"."""
    if name.endswith("_exps.weight"):
        return "expert"
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "norm"  # llama.cpp keeps 1-D tensors and norms as they are (F32 from its converter)
    if ".ffn_gate_inp." in name:
        return "router"  # and the router: routing is sensitive to small errors
    return "rest"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's "more bits" layers: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(name: str) -> str:
    """llama.cpp's tensor_get_category: substring tests in its order."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if key in name:
            return cat
    return "other"


def fallback(qtype: Q, row: int, table: dict[Q, Q]) -> Q:
    """The type written for rows of `row` values: `qtype`, its fallback, or F16 when neither holds whole blocks."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row % block == 0:
        return qtype
    qtype = table.get(qtype, qtype)
    return qtype if row % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise ValueError(f"cannot tell the layer of {name}")
    return int(m.group(1))


def llama_choices(
    recipe: str, tensors: Sequence[tuple[str, tuple[int, ...]]], n_layers: int, n_expert: int
) -> list[Q | None]:
    """llama.cpp's type for each quantizable (name, torch-order shape) in file order, before fallbacks; None for a
    tensor llama.cpp does not quantize (1-D, norms, routers: kept as they are)."""
    default, _ = LLAMA_FTYPES[recipe]
    cats = [category(n) for n, _ in tensors]
    tied = "output" not in cats
    n_attn_v = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
    i_attn_v = i_ffn_down = 0
    out: list[Q | None] = []
    for (name, shape), cat in zip(tensors, cats):
        if role_of(name, shape) in ("norm", "router") or not name.endswith("weight"):
            out.append(None)
            continue
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            t = Q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[t][0] else t if t == Q.Q8_0 else Q.Q6_K
        elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                t = Q.Q6_K
            if n_expert == 8:
                t = Q.Q8_0  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            i_attn_v += 1
        elif cat == "attn_k" and n_expert == 8:
            t = Q.Q8_0
        elif cat == "ffn_down":
            i_layer = _layer(name) if n_expert > 1 else i_ffn_down
            if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layers):
                t = Q.Q6_K
            i_ffn_down += 1
        elif cat == "attn_output" and n_expert == 8 and recipe == "q4_k_m":
            t = Q.Q5_K
        elif cat == "attn_qkv":
            t = {"q4_k_m": Q.Q5_K, "q5_k_m": Q.Q6_K}.get(recipe, t)
        out.append(t)
    return out


def choose(
    recipe: str,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    n_layers: int,
    n_expert: int,
    overrides: Overrides = NO_OVERRIDES,
    keep: Sequence[Q | None] | None = None,
) -> list[Choice]:
    """The type of every (name, torch-order shape), in file order. Norms and routers are F32, or `keep[i]` (the
    source's type when converting a GGUF: llama.cpp leaves them as they are)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    llama = llama_choices(recipe, tensors, n_layers, n_expert) if recipe != "lite" else None
    table = LITE_FALLBACK if recipe == "lite" else LLAMA_FALLBACK
    out = []
    for i, (name, shape) in enumerate(tensors):
        role = role_of(name, shape)
        if role in ("norm", "router"):
            t = (keep[i] if keep is not None else None) or Q.F32
            out.append(Choice(t, t))
            continue
        override = overrides.experts if role == "expert" else overrides.rest
        if override is not None:
            wanted = override
        elif llama is not None:
            wanted = llama[i] or Q.F32
        else:
            wanted = Q.Q4_K if role == "expert" else Q.Q8_0
        out.append(Choice(wanted, fallback(wanted, shape[-1], table)))
    return out


def file_type(recipe: str, overrides: Overrides, experts_wanted: Q | None) -> gguf.LlamaFileType:
    """general.file_type: a llama.cpp recipe's own, else named after the routed experts' type."""
    if recipe in LLAMA_FTYPES and overrides.experts is None:
        return LLAMA_FTYPES[recipe][1]
    named = {
        Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
        Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
        Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
        Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
        Q.F32: gguf.LlamaFileType.ALL_F32,
    }  # fmt: skip
    return (
        named.get(experts_wanted, gguf.LlamaFileType.GUESSED)
        if experts_wanted is not None
        else gguf.LlamaFileType.GUESSED
    )
