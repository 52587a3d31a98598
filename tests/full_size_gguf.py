"""Full-size DeepSeek-V2 / V2-Lite / V3 GGUF files that cost no disk: a real header, metadata and tensor infos, then the
file truncated to its full length (sparse: the tensor data reads as zeros and occupies no blocks).

The tensor types are llama.cpp's Q4_K_M choice for deepseek2 (`llama-quantize ... Q4_K_M`), from `lite.convert.recipes`
(the converter's `--recipe q4_k_m`, which follows llama.cpp's `llama_tensor_get_type`): Q4_K by default;
`output.weight` Q6_K; `ffn_down`, `ffn_down_shexp` and `ffn_down_exps` Q6_K on the "more bits" layers
(use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, n = block_count); a K-quant on a row (GGUF
ne0) that is not a multiple of 256 falls back Q4_K -> Q5_0, Q6_K -> Q8_0 (V2-Lite's `ffn_down_exps` rows of 1408
and dense `ffn_down` rows of 10944, every `attn_k_b` row of 128); 1-D tensors (V3's router bias `exp_probs_b.bias`
too) and the routers stay F32. The split
`attn_k_b` / `attn_v_b` are not attn_v-like for llama.cpp (only `attn_kv_b` is), so they stay Q4_K (Q5_0).
Shapes are in torch order (rows first; an expert stack is (n_expert, out, in)); GGUF stores the dims reversed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf
from lite.convert.recipes import choose, use_more_bits

__all__ = ["CONFIGS", "MOSTLY_Q4_K_M", "tensor_shapes", "tensor_types", "use_more_bits", "write_full_size_gguf"]

Q = gguf.GGMLQuantizationType

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
COMMON: dict[str, Any] = dict(
    vocab_size=102400,
    num_key_value_heads=128,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    kv_lora_rank=512,
    max_position_embeddings=163840,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    n_shared_experts=2,
    num_experts_per_tok=6,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling=YARN,
    scoring_func="softmax",
    bos_token_id=100000,
    eos_token_id=100001,
    tie_word_embeddings=False,
)
# deepseek-ai/DeepSeek-V2(-Chat) config.json
V2_CONFIG: dict[str, Any] = dict(
    COMMON,
    hidden_size=5120,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=60,
    num_attention_heads=128,
    q_lora_rank=1536,
    n_routed_experts=160,
    topk_method="group_limited_greedy",
    n_group=8,
    topk_group=3,
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
)
# deepseek-ai/DeepSeek-V2-Lite(-Chat) config.json
LITE_CONFIG: dict[str, Any] = dict(
    COMMON,
    num_key_value_heads=16,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    q_lora_rank=None,
    n_routed_experts=64,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
)
# deepseek-ai/DeepSeek-V3 (and R1) config.json: 671B, sigmoid router with a correction bias, noaux_tc groups
V3_CONFIG: dict[str, Any] = dict(
    COMMON,
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    first_k_dense_replace=3,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=8,
    topk_group=4,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=0,
    eos_token_id=1,
)
CONFIGS = {"v2": V2_CONFIG, "lite": LITE_CONFIG, "v3": V3_CONFIG}
NAMES = {"v2": "DeepSeek-V2-Chat", "lite": "DeepSeek-V2-Lite-Chat", "v3": "DeepSeek-V3"}
MOSTLY_Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M (general.file_type)


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch-order shape) of every tensor of a deepseek2 GGUF for the HF config `cfg`, in file order."""
    d, H, V = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    n, p, v, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    E, moe_ff, ff = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    sff = moe_ff * cfg["n_shared_experts"]
    lora = cfg["q_lora_rank"]
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (V, d))]
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (d,)))
        if lora:
            out += [
                (b + "attn_q_a.weight", (lora, d)),
                (b + "attn_q_a_norm.weight", (lora,)),
                (b + "attn_q_b.weight", (H * (n + p), lora)),
            ]
        else:
            out.append((b + "attn_q.weight", (H * (n + p), d)))
        out += [
            (b + "attn_kv_a_mqa.weight", (r + p, d)),
            (b + "attn_kv_a_norm.weight", (r,)),
            (b + "attn_k_b.weight", (H, r, n)),
            (b + "attn_v_b.weight", (H, v, r)),
            (b + "attn_output.weight", (d, H * v)),
            (b + "ffn_norm.weight", (d,)),
        ]
        if i < cfg["first_k_dense_replace"]:
            out += [(b + "ffn_gate.weight", (ff, d)), (b + "ffn_up.weight", (ff, d)), (b + "ffn_down.weight", (d, ff))]
            continue
        out.append((b + "ffn_gate_inp.weight", (E, d)))
        if cfg.get("scoring_func") == "sigmoid":
            out.append((b + "exp_probs_b.bias", (E,)))
        out += [
            (b + "ffn_gate_exps.weight", (E, moe_ff, d)),
            (b + "ffn_up_exps.weight", (E, moe_ff, d)),
            (b + "ffn_down_exps.weight", (E, d, moe_ff)),
            (b + "ffn_gate_shexp.weight", (sff, d)),
            (b + "ffn_up_shexp.weight", (sff, d)),
            (b + "ffn_down_shexp.weight", (d, sff)),
        ]
    out += [("output_norm.weight", (d,)), ("output.weight", (V, d))]
    return out


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape))
    assert shape[-1] % block == 0, (shape, qtype)
    return count // block * size


def tensor_types(cfg: dict[str, Any]) -> dict[str, tuple[Q, tuple[int, ...], int]]:
    """{name: (qtype, torch-order shape, nbytes)} of the Q4_K_M file for `cfg`."""
    shapes = tensor_shapes(cfg)
    choices = choose("q4_k_m", shapes, cfg["num_hidden_layers"], cfg["n_routed_experts"])
    return {name: (c.qtype, shape, nbytes(shape, c.qtype)) for (name, shape), c in zip(shapes, choices)}


def write_full_size_gguf(path: os.PathLike[str] | str, model: str = "lite") -> Path:
    """Write a sparse full-size Q4_K_M GGUF of `model` ("v2": DeepSeek-V2 236B, "lite": V2-Lite 16B, "v3":
    DeepSeek-V3 671B) to `path`: header, metadata and tensor infos are real; the data is a hole (zeros) of the
    right length."""
    cfg = CONFIGS[model]
    path = Path(path)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_name(NAMES[model])
    w.add_file_type(MOSTLY_Q4_K_M)
    add_metadata(w, gguf_metadata_from_hf(cfg))
    total = 0
    for name, (qtype, shape, size) in tensor_types(cfg).items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), size, raw_dtype=qtype)
        total += gguf.GGUFWriter.ggml_pad(size, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    data_start = gguf.GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
    fout.truncate(data_start + total)  # sparse: no data blocks are written
    fout.close()
    w.fout = None
    return path


if __name__ == "__main__":  # python tests/full_size_gguf.py OUT.gguf [v2|lite]: a sparse file for `lite plan`
    import sys

    print(write_full_size_gguf(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "lite"))
