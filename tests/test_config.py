"""ModelArgs from HF config.json (both styles) and from GGUF metadata (both layouts); name mapping; kv_b split."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from hf_helpers import merge_kv_b

from lite.config import ARCH, ModelArgs
from lite.convert.hf_meta import add_metadata, gguf_metadata_from_hf
from lite.convert.names import build_tensor, plan_tensors
from lite.errors import LiteError
from lite.weights import split_kv_b


def _config(ckpt) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _hub_style(cfg: dict) -> dict:
    """The same config as the hub writes it: top-level rope_theta and rope_scaling {"type": ...}."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    cfg["scoring_func"] = "softmax"
    return cfg


def test_roundtrip_through_gguf_file(hf_checkpoint, tmp_path):
    from quant.gguf_file import GGUFFile

    cfg = _config(hf_checkpoint)
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), ARCH)
    add_metadata(writer, gguf_metadata_from_hf(cfg))
    writer.add_tensor("token_embd.weight", torch.zeros(2, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = GGUFFile(path).metadata
    assert meta[f"{ARCH}.attention.head_count_kv"] == 1
    assert meta[f"{ARCH}.attention.key_length"] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert ModelArgs.from_gguf(meta) == ModelArgs.from_hf(cfg)


def test_hub_style_equals_transformers5_style(hf_checkpoint):
    cfg = _config(hf_checkpoint)
    args = ModelArgs.from_hf(cfg)
    assert ModelArgs.from_hf(_hub_style(cfg)) == args
    assert gguf_metadata_from_hf(_hub_style(cfg)) == gguf_metadata_from_hf(cfg)
    assert args.rope_type == ("default" if cfg["rope_parameters"]["rope_type"] == "default" else "yarn")


def test_older_gguf_layout(hf_checkpoint):
    """Before the k_b/v_b split llama.cpp wrote head_count_kv=n_head, per-head key/value lengths, no *_mla keys."""
    cfg = _config(hf_checkpoint)
    meta = {"general.architecture": ARCH, **gguf_metadata_from_hf(cfg)}
    a = f"{ARCH}.attention."
    for key in ("key_length_mla", "value_length_mla"):
        del meta[a + key]
    meta[a + "head_count_kv"] = cfg["num_attention_heads"]
    meta[a + "key_length"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    meta[a + "value_length"] = cfg["v_head_dim"]
    assert ModelArgs.from_gguf(meta) == ModelArgs.from_hf(cfg)


def test_metadata_keys_and_yarn_scale():
    from tiny_models import CONFIGS

    cfg = dict(CONFIGS["v2"], architectures=["DeepseekV2ForCausalLM"])
    meta = gguf_metadata_from_hf(cfg)
    k = f"{ARCH}."
    assert meta[k + "rope.scaling.type"] == "yarn"
    assert meta[k + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    assert meta[k + "expert_group_count"] == 4 and meta[k + "expert_group_used_count"] == 2
    assert meta[k + "expert_weights_scale"] == 16.0 and k + "expert_weights_norm" not in meta
    assert meta[k + "attention.q_lora_rank"] == 96 and meta[k + "leading_dense_block_count"] == 1
    args = ModelArgs.from_hf(cfg)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert args.softmax_scale() == pytest.approx(48**-0.5 * m * m)
    assert args.rope_cos_sin_scale() == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(LiteError, match="architecture"):
        ModelArgs.from_gguf({"general.architecture": "llama"})
    with pytest.raises(LiteError, match="lacks"):
        ModelArgs.from_gguf({"general.architecture": ARCH})
    with pytest.raises(LiteError, match="lacks"):
        ModelArgs.from_hf({"hidden_size": 4})


def test_kv_b_split_matches_per_head_definition():
    h, nope, v, r = 3, 5, 4, 7
    kv_b = torch.randn(h * (nope + v), r)
    k_b, v_b = split_kv_b(kv_b, h, nope, v)
    assert k_b.shape == (h, r, nope) and v_b.shape == (h, v, r)
    for i in range(h):
        rows = kv_b[i * (nope + v) : (i + 1) * (nope + v)]
        assert torch.equal(k_b[i], rows[:nope].T) and torch.equal(v_b[i], rows[nope:])
    assert torch.equal(merge_kv_b(k_b, v_b), kv_b)


def test_plan_tensors(hf_checkpoint):
    from safetensors import safe_open

    cfg = _config(hf_checkpoint)
    args = ModelArgs.from_hf(cfg)
    with safe_open(str(hf_checkpoint / "model.safetensors"), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        plans = plan_tensors(shapes, args)
        names = [p.name for p in plans]
        assert len(names) == len(set(names))
        for p in plans:
            assert build_tensor(p, [f.get_tensor(s) for s in p.sources], args).shape == p.shape
    e = args.n_routed_experts
    assert ("blk.1.ffn_gate_exps.weight", (e, args.moe_intermediate_size, args.hidden_size)) in [
        (p.name, p.shape) for p in plans
    ]
    assert "blk.0.attn_k_b.weight" in names and "blk.0.attn_kv_b.weight" not in names
    assert ("blk.0.attn_q.weight" in names) == (args.q_lora_rank is None)
    del shapes["model.layers.2.mlp.experts.1.up_proj.weight"]
    with pytest.raises(LiteError, match="lacks up_proj"):
        plan_tensors(shapes, args)
    with pytest.raises(LiteError, match="no llama.cpp name"):
        plan_tensors({**shapes, "model.bogus.weight": (2,)}, args)


V2_LITE_HUB = {  # DeepSeek-V2-Lite's config.json as published (hub style)
    "architectures": ["DeepseekV2ForCausalLM"], "first_k_dense_replace": 1, "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy",
    "v_head_dim": 128, "vocab_size": 102400,
}  # fmt: skip
V2_HUB = dict(V2_LITE_HUB, q_lora_rank=1536, hidden_size=5120, intermediate_size=12288, n_group=8, topk_group=3,
              topk_method="group_limited_greedy", n_routed_experts=160, num_attention_heads=128,
              num_hidden_layers=60, routed_scaling_factor=16.0, max_position_embeddings=163840)  # fmt: skip


@pytest.mark.parametrize("cfg", [V2_LITE_HUB, V2_HUB], ids=["V2-Lite", "V2"])
def test_published_configs(cfg):
    args = ModelArgs.from_hf(cfg)
    assert args.latent_dim == 576 and args.qk_head_dim == 192
    meta = gguf_metadata_from_hf(cfg)
    assert meta[f"{ARCH}.attention.key_length"] == 576 and meta[f"{ARCH}.attention.value_length"] == 512
    assert meta[f"{ARCH}.rope.scaling.factor"] == 40 and meta[f"{ARCH}.rope.scaling.original_context_length"] == 4096
    assert ModelArgs.from_gguf(meta) == args
    assert (args.topk_method == "group_limited_greedy") == (cfg["n_group"] > 1)


def demo_metadata() -> dict:
    from cli.common import DEFAULT_MODEL
    from quant.gguf_file import GGUFFile

    return dict(GGUFFile(DEFAULT_MODEL).metadata)


def test_metadata_that_disagrees_is_named():
    meta = demo_metadata()
    cases = [
        ({"deepseek2.block_count": 0}, "GGUF metadata deepseek2.block_count = 0 is not a whole number >= 1"),
        ({"deepseek2.context_length": "512"}, "deepseek2.context_length = '512' is not a whole number >= 1"),
        ({"deepseek2.expert_used_count": 17}, "deepseek2.expert_used_count = 17 exceeds the 16 experts"),
        ({"deepseek2.attention.layer_norm_rms_epsilon": float("nan")}, "layer_norm_rms_epsilon = nan is not a finite"),
        ({"deepseek2.vocab_size": 4000}, "deepseek2.vocab_size = 4000 disagrees with the 4096 tokens of the tokenizer"),
        ({"deepseek2.leading_dense_block_count": 5}, "deepseek2.leading_dense_block_count = 5 exceeds the block count"),
        ({"deepseek2.rope.dimension_count": "32"}, "GGUF metadata holds a value of the wrong type"),
    ]
    for change, message in cases:
        with pytest.raises(LiteError) as e:
            ModelArgs.from_gguf({**meta, **change})
        assert message in str(e.value) and str(e.value).endswith("the file is corrupt"), str(e.value)


def test_any_wrong_metadata_value_is_a_lite_error_or_accepted():
    meta = demo_metadata()
    keys = [k for k in meta if k.startswith("deepseek2.")]
    for key in keys:
        for value in ("x", -1, 0, 2**40, float("nan"), float("inf"), [1, 2], True, None):
            try:
                args = ModelArgs.from_gguf({**meta, key: value})
            except LiteError:
                continue
            assert args.num_hidden_layers >= 1 and args.vocab_size >= 1  # accepted: still a usable shape


def test_tensors_beyond_the_block_count_are_refused():
    from lite.config import check_tensor_layers

    args = ModelArgs.from_gguf(demo_metadata())
    check_tensor_layers(args, ["blk.3.attn_norm.weight", "output.weight"])
    with pytest.raises(LiteError, match="tensors for layer 4 but deepseek2.block_count is 4"):
        check_tensor_layers(args, ["blk.4.attn_norm.weight"])
