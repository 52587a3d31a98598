"""Converting DeepseekV3ForCausalLM checkpoints: metadata and names as llama.cpp's converter, FP8 block-scaled
weights dequantized exactly, MTP layers skipped, quantized recipes, and llama.cpp itself on our file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_helpers import tensors_from_hf
from safetensors.torch import load_file, save_file
from test_model import TOKENS, assert_parity
from tiny_models import reference_logits

import lite
import lite.convert.writer as convert_mod
from lite.config import ARCH, ModelArgs
from lite.convert import convert
from lite.convert.hf_meta import gguf_metadata_from_hf
from lite.errors import LiteError
from quant.gguf_file import GGUFFile

Q = gguf.GGMLQuantizationType

V3_HUB = {  # deepseek-ai/DeepSeek-V3's config.json as published (R1 has the same layout)
    "architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 3, "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip
MOONLIGHT_HUB = dict(V3_HUB, first_k_dense_replace=1, hidden_size=2048, intermediate_size=11264, n_group=1,
                     topk_group=1, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                     num_attention_heads=16, num_key_value_heads=16, num_experts_per_tok=6, num_hidden_layers=27,
                     q_lora_rank=None, rope_theta=50000.0, rope_scaling=None, routed_scaling_factor=2.446,
                     max_position_embeddings=8192, vocab_size=163840, num_nextn_predict_layers=0)  # fmt: skip
KIMI_K2_HUB = dict(V3_HUB, first_k_dense_replace=1, n_group=1, topk_group=1, n_routed_experts=384,
                   num_attention_heads=64, num_key_value_heads=64, rope_theta=50000.0, routed_scaling_factor=2.827,
                   max_position_embeddings=131072, vocab_size=163840, num_nextn_predict_layers=0,
                   rope_scaling=dict(V3_HUB["rope_scaling"], factor=32.0))  # fmt: skip


def test_v3_metadata_as_llama_cpp_writes_it():
    """The deepseek2.* keys llama.cpp's DeepseekV2Model (which takes DeepseekV3ForCausalLM) writes for DeepSeek-V3."""
    meta = {k.removeprefix(f"{ARCH}."): v for k, v in gguf_metadata_from_hf(V3_HUB).items()}
    assert meta == {
        "block_count": 61, "context_length": 163840, "embedding_length": 7168, "feed_forward_length": 18432,
        "attention.head_count": 128, "attention.head_count_kv": 1, "rope.scaling.type": "yarn",
        "rope.scaling.factor": 40.0, "rope.scaling.original_context_length": 4096,
        "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-06, "expert_used_count": 8, "expert_group_count": 8,
        "expert_group_used_count": 4, "expert_gating_func": 2, "leading_dense_block_count": 3,
        "vocab_size": 129280, "attention.q_lora_rank": 1536, "attention.kv_lora_rank": 512,
        "attention.key_length": 576, "attention.value_length": 512, "attention.key_length_mla": 192,
        "attention.value_length_mla": 128, "expert_feed_forward_length": 2048, "expert_count": 256,
        "expert_shared_count": 1, "expert_weights_scale": 2.5, "expert_weights_norm": True,
        "rope.dimension_count": 64, "rope.scaling.yarn_log_multiplier": pytest.approx(0.1),
    }  # fmt: skip


@pytest.mark.parametrize("cfg", [V3_HUB, MOONLIGHT_HUB, KIMI_K2_HUB], ids=["V3", "Moonlight", "Kimi-K2"])
def test_published_configs_roundtrip(cfg):
    args = ModelArgs.from_hf(cfg)
    assert (args.scoring_func, args.topk_method, args.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    assert ModelArgs.from_gguf(gguf_metadata_from_hf(cfg)) == args
    # transformers' DeepseekV3 routes by sigmoid + noaux_tc whatever config.json says: so does lite by default
    bare = {k: v for k, v in cfg.items() if k not in ("scoring_func", "topk_method")}
    assert ModelArgs.from_hf(bare) == args


def test_bad_router_configs():
    with pytest.raises(LiteError, match="scoring_func 'sqrtsoftplus'"):
        ModelArgs.from_hf(dict(V3_HUB, scoring_func="sqrtsoftplus"))
    with pytest.raises(LiteError, match="topk_method 'aux'"):
        ModelArgs.from_hf(dict(V3_HUB, topk_method="aux"))
    with pytest.raises(LiteError, match="split evenly into the groups"):
        ModelArgs.from_hf(dict(V3_HUB, n_group=7))


def test_bias_tensor_name_type_and_values(hf_v3, tmp_path):
    w = load_file(str(hf_v3 / "model.safetensors"))
    args = ModelArgs.from_hf(json.loads((hf_v3 / "config.json").read_text()))
    convert(hf_v3, tmp_path / "q.gguf")  # the default recipe: the bias stays F32 like every 1-D tensor
    g = GGUFFile(tmp_path / "q.gguf")
    for i in range(args.num_hidden_layers):
        name = f"blk.{i}.exp_probs_b.bias"
        if not args.is_moe_layer(i):
            assert name not in g.tensors
            continue
        t = g.tensors[name]
        assert t.qtype == Q.F32 and t.shape == (args.n_routed_experts,)
        assert np.array_equal(t.data.view(np.float32), w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"])
        assert g.tensors[f"blk.{i}.ffn_gate_inp.weight"].qtype == Q.F32


def test_quantized_recipe_against_f32(hf_v3, tmp_path):
    """As for V2: mean KL(f32 ‖ quantized) and top-1 agreement over 64 positions.

    Measured (default recipe; all-Q8_0 experts): v3 KL 1.2e-2 (8.6e-3), top-1 0.81; moonlight 1.7e-2 (5.0e-3),
    0.66; kimi 2.5e-2 (1.7e-2), 0.75 — like V2's grouped `v2` config (4.0e-2, 0.61): a random tiny sigmoid router
    with a correction bias of the scores' own spread has many near-ties, so some positions flip experts whatever
    the bits. The bounds would still catch a wrong tensor in a slot (KL of order 1) or a broken quantizer."""
    tokens = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    logp = {}
    for name, options in {"f32": dict(outtype="f32"), "default": {}, "q8_0": dict(experts="q8_0")}.items():
        convert(hf_v3, tmp_path / f"{name}.gguf", **options)
        logp[name] = torch.log_softmax(lite.load(str(tmp_path / f"{name}.gguf"), device="cpu").logits(tokens), -1)

    def kl(name: str) -> float:
        return float((logp["f32"].exp() * (logp["f32"] - logp[name])).sum(-1).mean())

    top1 = float((logp["f32"].argmax(-1) == logp["default"].argmax(-1)).float().mean())
    print(f"{hf_v3.name}: default recipe vs f32: mean KL {kl('default'):.2e} (Q8_0 experts {kl('q8_0'):.2e}), "
          f"top-1 {top1:.3f}")  # fmt: skip
    assert kl("default") < 0.05 and top1 >= 0.6
    assert kl("q8_0") < kl("default")  # more bits, closer to f32


# --- FP8 (DeepSeek-V3/R1's release format) ---------------------------------------------------------------------


def test_fp8_is_dequantized_exactly(hf_fp8, tmp_path, monkeypatch):
    """Every tensor of the f32 GGUF from the fp8 checkpoint equals the one from its dequantized twin, bit for bit,
    also when row slices cut through the 128-row scale blocks."""
    fp8, ref = hf_fp8
    s = convert(fp8, tmp_path / "fp8.gguf", outtype="f32")
    assert any("fp8 weights dequantized exactly with their 128x128 block scales" in n for n in s.notes)
    convert(ref, tmp_path / "ref.gguf", outtype="f32")
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 100 * 256)  # slices of 100 rows: blocks straddled
    convert(fp8, tmp_path / "sliced.gguf", outtype="f32")
    a, b, c = (GGUFFile(tmp_path / f"{n}.gguf") for n in ("fp8", "ref", "sliced"))
    assert list(a.tensors) == list(b.tensors) == list(c.tensors)
    assert not any("scale" in name for name in a.tensors)
    for name in a.tensors:
        assert np.array_equal(a.tensors[name].data, b.tensors[name].data), name
        assert np.array_equal(c.tensors[name].data, b.tensors[name].data), name
    args = ModelArgs.from_hf(json.loads((ref / "config.json").read_text()))
    mem_fp8, mem_ref = tensors_from_hf(fp8, args), tensors_from_hf(ref, args)
    assert all(np.array_equal(mem_fp8[n].data, mem_ref[n].data) for n in mem_ref)


def test_fp8_parity_and_recipe(hf_fp8, tmp_path):
    """fp8 → f32 GGUF matches transformers on the dequantized weights; the default recipe quantizes exactly what
    it would from the dequantized weights."""
    fp8, ref = hf_fp8
    convert(fp8, tmp_path / "f32.gguf", outtype="f32")
    ours, want = lite.load(str(tmp_path / "f32.gguf"), device="cpu").logits(TOKENS), reference_logits(ref, TOKENS)
    print(f"fp8: f32 GGUF, max |err| / max |logit| = {float((ours - want).abs().max() / want.abs().max()):.2e}")
    assert_parity(ours, want)
    convert(fp8, tmp_path / "q.gguf")
    convert(ref, tmp_path / "q_ref.gguf")
    q, q_ref = GGUFFile(tmp_path / "q.gguf"), GGUFFile(tmp_path / "q_ref.gguf")
    assert {n: t.qtype for n, t in q.tensors.items()} == {n: t.qtype for n, t in q_ref.tensors.items()}
    assert all(np.array_equal(t.data, q_ref.tensors[n].data) for n, t in q.tensors.items())


def _edit(ckpt: Path, fn) -> None:
    w = load_file(str(ckpt / "model.safetensors"))
    fn(w)
    save_file(w, str(ckpt / "model.safetensors"))


def _cfg(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


FP8_BAD = {
    "scale missing": (
        lambda c: _edit(c, lambda w: w.pop("model.layers.2.mlp.experts.3.up_proj.weight_scale_inv")),
        "model.layers.2.mlp.experts.3.up_proj.weight is F8_E4M3 but the checkpoint lacks its block scales",
    ),
    "scale of the wrong shape": (
        lambda c: _cfg(c, quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}),
        "weight_scale_inv has shape .* needs",
    ),
    "another quantization": (
        lambda c: _cfg(c, quantization_config={"quant_method": "gptq", "bits": 4}),
        "quant_method is 'gptq'",
    ),
}


@pytest.mark.parametrize("case", list(FP8_BAD))
def test_fp8_bad_input(hf_fp8, tmp_path, case):
    ckpt = tmp_path / "hf"
    shutil.copytree(hf_fp8[0], ckpt)
    damage, message = FP8_BAD[case]
    damage(ckpt)
    with pytest.raises(LiteError, match=message) as e:
        convert(ckpt, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


# --- multi-token prediction ----------------------------------------------------------------------------------


def test_mtp_layers_are_skipped_with_one_line(hf_v3, tmp_path, capsys):
    """A checkpoint with DeepSeek-V3's MTP layer (index num_hidden_layers): the same GGUF tensors, one note."""
    from cli.main import main

    args = ModelArgs.from_hf(json.loads((hf_v3 / "config.json").read_text()))
    L = args.num_hidden_layers
    ckpt = tmp_path / "mtp"
    shutil.copytree(hf_v3, ckpt)

    def add_mtp(w: dict) -> None:
        last = f"model.layers.{L - 1}."
        for name in [n for n in w if n.startswith(last)]:
            w[name.replace(last, f"model.layers.{L}.")] = w[name].clone()
        d, V = args.hidden_size, args.vocab_size
        extra = {
            "embed_tokens.weight": (V, d),
            "enorm.weight": (d,),
            "hnorm.weight": (d,),
            "eh_proj.weight": (d, 2 * d),
        }
        extra |= {"shared_head.norm.weight": (d,), "shared_head.head.weight": (V, d)}
        for name, shape in extra.items():
            w[f"model.layers.{L}.{name}"] = torch.ones(shape)

    _edit(ckpt, add_mtp)
    _cfg(ckpt, num_nextn_predict_layers=1)
    plain = convert(hf_v3, tmp_path / "plain.gguf", outtype="f32")
    assert not any("multi-token" in n for n in plain.notes)
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "mtp.gguf"), "--outtype", "f32"]) == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("skipped 1 multi-token-prediction layer(s) (num_nextn_predict_layers)") == 1
    a, b = GGUFFile(tmp_path / "plain.gguf"), GGUFFile(tmp_path / "mtp.gguf")
    assert list(a.tensors) == list(b.tensors) and not any(n.startswith(f"blk.{L}.") for n in b.tensors)
    assert all(np.array_equal(a.tensors[n].data, b.tensors[n].data) for n in a.tensors)
    assert b.metadata[f"{ARCH}.block_count"] == L


# --- cross-check: llama.cpp itself runs our file (needs `pip install llama-cpp-python`; skipped without it) ----


def test_llama_cpp_runs_our_v3_f32_file(hf_v3, tmp_path):
    """llama.cpp (sigmoid gate, exp_probs_b, top-2-sum groups, weight norm and scale) on our f32 file agrees with
    the reference at every position."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tiny_tokenizer = pytest.importorskip("tiny_tokenizer")
    from test_convert import _llama_cpp_logits

    ckpt = tmp_path / "hf"
    shutil.copytree(hf_v3, ckpt)
    tiny_tokenizer.write_tiny_tokenizer(ckpt)
    convert(ckpt, tmp_path / "m.gguf", outtype="f32")
    tokens = [0, 17, 300, 42, 7, 511, 100, 250, 3, 64, 128, 9]
    got, ref = _llama_cpp_logits(tmp_path / "m.gguf", tokens), reference_logits(ckpt, tokens)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, f"llama.cpp vs reference: max error {err:.2e} of the largest logit"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
