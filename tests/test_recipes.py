"""Recipes (lite/convert/recipes.py): llama.cpp's tensor-type choices for deepseek2, lite's default, overrides.

The llama.cpp rules are checked here on the full V2-Lite / V2 tensor lists; tests/test_convert_gguf.py compares
whole files with llama.cpp's own quantizer where llama-cpp-python is installed.
"""

from __future__ import annotations

import gguf
import pytest
from full_size_gguf import CONFIGS, tensor_shapes

from lite.convert.recipes import NO_OVERRIDES, Overrides, category, choose, fallback, file_type, use_more_bits

Q = gguf.GGMLQuantizationType


def types(recipe: str, model: str = "lite", overrides: Overrides = NO_OVERRIDES) -> dict[str, Q]:
    cfg = CONFIGS[model]
    shapes = tensor_shapes(cfg)
    choices = choose(recipe, shapes, cfg["num_hidden_layers"], cfg["n_routed_experts"], overrides)
    return {name: c.qtype for (name, _), c in zip(shapes, choices)}


def test_use_more_bits_layers() -> None:
    assert [i for i in range(27) if use_more_bits(i, 27)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]
    assert sum(use_more_bits(i, 60) for i in range(60)) == 7 + 8 + 15


def test_q4_k_m_on_v2_lite() -> None:
    t = types("q4_k_m")
    assert t["output.weight"] == Q.Q6_K and t["token_embd.weight"] == Q.Q4_K
    assert t["output_norm.weight"] == t["blk.1.ffn_gate_inp.weight"] == t["blk.1.attn_kv_a_norm.weight"] == Q.F32
    for name in ("attn_q", "attn_kv_a_mqa", "attn_v_b", "attn_output", "ffn_gate_exps", "ffn_up_shexp"):
        assert t[f"blk.5.{name}.weight"] == Q.Q4_K, name
    assert t["blk.5.attn_k_b.weight"] == Q.Q5_0  # rows of 128: Q4_K falls back to Q5_0
    assert t["blk.0.ffn_down.weight"] == Q.Q8_0  # layer 0 gets more bits: Q6_K, rows of 10944 -> Q8_0
    for i in range(1, 27):
        more = use_more_bits(i, 27)
        assert t[f"blk.{i}.ffn_down_exps.weight"] == (Q.Q8_0 if more else Q.Q5_0)  # rows of 1408
        assert t[f"blk.{i}.ffn_down_shexp.weight"] == (Q.Q6_K if more else Q.Q4_K)  # rows of 2816


def test_q4_k_m_on_v2() -> None:
    t = types("q4_k_m", "v2")
    assert t["blk.0.attn_q_a.weight"] == t["blk.0.attn_q_b.weight"] == Q.Q4_K
    assert t["blk.8.ffn_down_exps.weight"] == Q.Q4_K and t["blk.9.ffn_down_exps.weight"] == Q.Q6_K  # rows of 1536
    assert t["blk.59.ffn_down_exps.weight"] == Q.Q6_K


def test_other_llama_recipes() -> None:
    t = types("q5_k_m")
    assert t["output.weight"] == Q.Q6_K and t["blk.5.attn_q.weight"] == Q.Q5_K
    assert t["blk.3.ffn_down_exps.weight"] == Q.Q5_1  # Q5_K on rows of 1408 falls back to Q5_1, as llama.cpp
    assert t["blk.2.ffn_down_exps.weight"] == Q.Q8_0 and t["blk.2.ffn_down_shexp.weight"] == Q.Q6_K
    t = types("q6_k")
    assert {t["output.weight"], t["token_embd.weight"], t["blk.3.ffn_up_exps.weight"]} == {Q.Q6_K}
    assert t["blk.3.ffn_down_exps.weight"] == t["blk.3.attn_k_b.weight"] == Q.Q8_0
    t = types("q8_0")
    assert {v for k, v in t.items() if not k.endswith("norm.weight") and "gate_inp" not in k} == {Q.Q8_0}


def test_eight_experts_and_legacy_kv_b() -> None:
    """With 8 experts llama.cpp bumps attn_kv_b to Q8_0 and (Q4_K_M) attn_output to Q5_K; attn_kv_b is attn_v-like."""
    shapes = [(f"blk.{i}.{n}.weight", (512, 256)) for i in range(16) for n in ("attn_kv_b", "attn_output")]
    shapes += [("output.weight", (1000, 256))]
    for n_expert, kv_b, out in ((8, Q.Q8_0, Q.Q5_K), (64, None, Q.Q4_K)):
        c = {n: x.qtype for (n, _), x in zip(shapes, choose("q4_k_m", shapes, 16, n_expert))}
        assert c["blk.3.attn_output.weight"] == out
        for i in range(16):  # counted in file order, as llama.cpp's i_attention_wv
            assert c[f"blk.{i}.attn_kv_b.weight"] == (kv_b or (Q.Q6_K if use_more_bits(i, 16) else Q.Q4_K))


def test_lite_recipe_and_overrides() -> None:
    t = types("lite")
    assert t["blk.1.ffn_gate_exps.weight"] == Q.Q4_K and t["blk.1.ffn_down_exps.weight"] == Q.Q4_0
    assert t["output.weight"] == t["blk.1.attn_k_b.weight"] == t["blk.0.ffn_down.weight"] == Q.Q8_0
    t = types("q4_k_m", overrides=Overrides(experts=Q.Q8_0))
    assert t["blk.1.ffn_up_exps.weight"] == Q.Q8_0 and t["output.weight"] == Q.Q6_K
    t = types("q4_k_m", overrides=Overrides(experts=Q.Q4_K, rest=Q.F16))
    assert t["blk.3.ffn_down_exps.weight"] == Q.Q5_0  # an override falls back as its recipe does
    assert t["output.weight"] == t["blk.3.attn_q.weight"] == Q.F16 and t["output_norm.weight"] == Q.F32


def test_fallbacks_and_categories() -> None:
    lite, llama = {Q.Q4_K: Q.Q4_0}, {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
    assert fallback(Q.Q4_K, 1408, lite) == Q.Q4_0 and fallback(Q.Q4_K, 1408, llama) == Q.Q5_0
    assert fallback(Q.Q6_K, 48, llama) == Q.F16 and fallback(Q.Q8_0, 48, llama) == Q.F16
    assert fallback(Q.Q6_K, 512, llama) == Q.Q6_K and fallback(Q.BF16, 7, llama) == Q.BF16
    assert category("blk.1.attn_v_b.weight") == "other" and category("blk.1.attn_kv_b.weight") == "attn_kv_b"
    assert category("blk.1.ffn_down_shexp.weight") == "ffn_down" and category("output.weight") == "output"


def test_file_types() -> None:
    assert file_type("q4_k_m", NO_OVERRIDES, Q.Q4_K) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert file_type("q6_k", Overrides(rest=Q.Q8_0), Q.Q6_K) == gguf.LlamaFileType.MOSTLY_Q6_K
    assert file_type("q6_k", Overrides(experts=Q.F32, rest=Q.F32), Q.F32) == gguf.LlamaFileType.ALL_F32
    assert file_type("lite", NO_OVERRIDES, Q.Q4_K) == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="unknown recipe"):
        choose("q3_k_m", [("output.weight", (8, 256))], 1, 8)
